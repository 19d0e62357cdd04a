"""Module maps: how a Flax kernel path becomes PyTorch module names, for PEFT interop.

A `ModuleMap` holds one `ModuleRule` per kind of kernel: the name template (regex groups
and ``{0}``, ``{1}``... for stacked-layer indices), the transpose, the flattening of
multi-axis kernels (head-major), and the split of fused kernels.
`lora_jax.peft.export_adapter` and `lora_jax.peft.import_adapter` use it, through
`module_slots` (where each module sits in a kernel, as `Slot`) and `unsupported_reason`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import string
import typing
from collections.abc import Mapping

import numpy as np

from lora_jax.core._layout import Layout, matrix_layout

__all__ = ["ModuleMap", "ModuleRule"]


@dataclasses.dataclass(frozen=True)
class ModuleRule:
    """How the Flax kernels whose path matches `pattern` become PyTorch modules.

    Attributes:
        pattern: a regex that must match the whole `/`-joined Flax path.
        module: the PyTorch module name template (without ``base_model.model.``), or a
            tuple of them to split a fused kernel along its flattened output. Groups of
            `pattern` expand as in `re.Match.expand` (``\\1``, ``\\g<name>``); ``{0}``,
            ``{1}``... stand for the indices along the kernel's stack axes (scanned
            layers), and each stack axis needs its placeholder.
        sizes: widths of the parts of a fused kernel along its flattened output, one per
            template; None splits it into equal parts.
        kind: ``"linear"`` or ``"embedding"`` (PEFT's tensor names); None takes
            ``"embedding"`` for an ``embed`` layout and ``"linear"`` otherwise.

    Example:
        >>> import lora_jax as lj
        >>> rule = lj.peft.ModuleRule(
        ...     r"params/layers_(\\d+)/(\\w+)/kernel", r"model.layers.\\1.\\2"
        ... )
        >>> lj.peft.ModuleMap((rule,)).modules_for("params/layers_3/fc/kernel", (8, 4))
        ['model.layers.3.fc']
    """

    pattern: str
    module: str | tuple[str, ...]
    sizes: tuple[int, ...] | None = None
    kind: str | None = None

    def __post_init__(self) -> None:
        try:
            re.compile(self.pattern)
        except re.error as err:
            raise ValueError(
                f"ModuleRule `pattern` {self.pattern!r} is not a regex: {err}."
            ) from err
        modules = (self.module,) if isinstance(self.module, str) else tuple(self.module)
        if not modules or not all(isinstance(m, str) and m for m in modules):
            raise ValueError(
                f"ModuleRule `module` must be non-empty strings; found {self.module!r}."
            )
        object.__setattr__(self, "module", modules[0] if isinstance(self.module, str) else modules)
        if self.sizes is not None:
            sizes = tuple(self.sizes)
            if len(sizes) != len(modules) or not all(
                isinstance(s, int | np.integer) and s > 0 for s in sizes
            ):
                raise ValueError(
                    f"ModuleRule `sizes` must be {len(modules)} positive ints (one per module "
                    f"template); found {self.sizes!r}."
                )
            object.__setattr__(self, "sizes", sizes)
        if self.kind not in (None, "linear", "embedding"):
            raise ValueError(
                f"ModuleRule `kind` must be None, 'linear' or 'embedding'; found {self.kind!r}."
            )

    @property
    def templates(self) -> tuple[str, ...]:
        """The module name templates, as a tuple."""
        return (self.module,) if isinstance(self.module, str) else tuple(self.module)


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one PyTorch module's adapter sits in a Flax kernel."""

    path: str
    index: tuple[int, ...]  # along the stack axes
    start: int  # slice of the flattened output
    stop: int
    kind: str  # "linear" or "embedding"
    layout: Layout
    shape: tuple[int, ...]  # of the whole Flax kernel


@dataclasses.dataclass(frozen=True)
class ModuleMap:
    """Flax kernel paths to PyTorch module names: an ordered list of `ModuleRule`.

    The first rule whose pattern matches a path applies. Paths matching an `unsupported`
    pattern have no PEFT equivalent: exporting an adapter there raises with the reason.

    Attributes:
        rules: the rules, tried in order.
        unsupported: ``{regex: reason}`` (stored as pairs) for kernels PEFT cannot adapt
            the way lora_jax does, e.g. an embedding that is also the output head.

    Example:
        A Flax `nn.MultiHeadDotProductAttention` mapped onto a PyTorch module that has
        Linears ``q_proj``, ``k_proj``, ``v_proj`` (weights ``(heads*head_dim, d)``) and
        ``out_proj`` (``(d, heads*head_dim)``), exported for PEFT:

        >>> import json, pathlib, tempfile, jax, jax.numpy as jnp, flax.linen as nn
        >>> import lora_jax as lj
        >>> model = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)
        >>> x = jnp.ones((1, 3, 8))
        >>> variables = model.init(jax.random.key(0), x)
        >>> layouts = lj.infer_layouts(model.apply, variables, x)
        >>> mha_map = lj.peft.ModuleMap((
        ...     lj.peft.ModuleRule("params/query/kernel", "q_proj"),
        ...     lj.peft.ModuleRule("params/key/kernel", "k_proj"),
        ...     lj.peft.ModuleRule("params/value/kernel", "v_proj"),
        ...     lj.peft.ModuleRule("params/out/kernel", "out_proj"),
        ... ))
        >>> config = lj.LoraConfig(rank=2, alpha=4.0, targets=".*/kernel")
        >>> frozen, lora = lj.split(variables, config, key=jax.random.key(1), layouts=layouts)
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> lj.peft.export_adapter(folder, lora, module_map=mha_map, task_type=None)
        >>> json.loads((folder / "adapter_config.json").read_text())["target_modules"]
        ['k_proj', 'out_proj', 'q_proj', 'v_proj']
        >>> back = lj.peft.import_adapter(folder, frozen, module_map=mha_map, layouts=layouts)
        >>> back["params"]["out"]["kernel"].a.shape  # (heads, head_dim, rank)
        (2, 4, 2)
    """

    rules: tuple[ModuleRule, ...]
    unsupported: Mapping[str, str] | tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        rules = tuple(self.rules)
        if not all(isinstance(r, ModuleRule) for r in rules):
            raise TypeError("ModuleMap `rules` must be ModuleRule instances.")
        object.__setattr__(self, "rules", rules)
        pairs = self.unsupported
        pairs = tuple(pairs.items()) if isinstance(pairs, Mapping) else tuple(pairs)
        object.__setattr__(self, "unsupported", pairs)

    def modules_for(
        self, path: str, shape: tuple[int, ...], layout: Layout | None = None
    ) -> list[str]:
        """The PyTorch module names of the kernel at `path` (to check a map by hand).

        Args:
            path: the `/`-joined Flax parameter path.
            shape: the kernel's shape.
            layout: the kernel's layout; needed for more than 2 axes.

        Returns:
            The module names (several for a stacked or fused kernel); empty when no rule
            matches.

        Raises:
            ValueError: the path is `unsupported`, or the rule does not fit the kernel.
        """
        reason = unsupported_reason(self, path)
        if reason is not None:
            raise ValueError(f"{path}: {reason}")
        return list(module_slots(self, path, tuple(shape), layout) or {})


def unsupported_reason(module_map: ModuleMap, path: str) -> str | None:
    """Why `module_map` marks the kernel at `path` unsupported; None when it does not."""
    pairs = typing.cast(tuple[tuple[str, str], ...], module_map.unsupported)  # __post_init__
    return next((why for pat, why in pairs if re.fullmatch(pat, path)), None)


def module_slots(
    module_map: ModuleMap, path: str, shape: tuple[int, ...], layout: Layout | None
) -> dict[str, Slot] | None:
    """``{module name: Slot}`` for the kernel at `path` (stacked layers, fused parts);
    None when no rule matches. A ValueError when the first matching rule does not fit."""
    hit = next(((r, m) for r in module_map.rules if (m := re.fullmatch(r.pattern, path))), None)
    if hit is None:
        return None
    rule, match = hit
    layout = layout or matrix_layout(len(shape))
    if layout is None or layout.ndim != len(shape):
        raise ValueError(
            f"{path} has shape {shape}: which axes are inputs, outputs or stacked layers "
            f"cannot be known from the shape alone; pass "
            f"layouts=lj.infer_layouts(model.apply, variables, *example_inputs)."
        )
    if layout.kind == "conv":
        raise ValueError(f"{path}: conv kernels are not supported by the PEFT exchange.")
    stack, _, outs = layout.sizes(shape)
    templates = [match.expand(t) for t in rule.templates]
    sizes = rule.sizes or _equal_parts(path, math.prod(outs), len(templates))
    if sum(sizes) != math.prod(outs):
        raise ValueError(
            f"{path}: the rule's sizes {sizes} sum to {sum(sizes)}, but the kernel's "
            f"flattened output has {math.prod(outs)} features."
        )
    for template in templates:
        _check_placeholders(path, template, len(stack))
    kind = rule.kind or ("embedding" if layout.kind == "embed" else "linear")
    slots = {}
    for index in np.ndindex(*stack):
        start = 0
        for template, size in zip(templates, sizes, strict=True):
            name = template.format(*index)
            slots[name] = Slot(path, index, start, start + size, kind, layout, shape)
            start += size
    return slots


def _equal_parts(path: str, width: int, n: int) -> tuple[int, ...]:
    if width % n:
        raise ValueError(f"{path}: {width} output features do not split into {n} equal parts.")
    return (width // n,) * n


def _check_placeholders(path: str, template: str, n_stack: int) -> None:
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as err:
        raise ValueError(f"{path}: module template {template!r} is malformed: {err}.") from err
    want = {str(i) for i in range(n_stack)}
    if fields != want:
        raise ValueError(
            f"{path}: module template {template!r} has placeholders {sorted(fields)}, but the "
            f"kernel has {n_stack} stack axes and needs exactly {sorted(want)} (one module per "
            f"stacked layer)."
        )


def listing(names: list[str], limit: int = 20) -> str:
    """The names one per indented line (at most `limit`), for error messages."""
    more = f"\n  ... ({len(names) - limit} more)" if len(names) > limit else ""
    return "\n  " + "\n  ".join(names[:limit]) + more
