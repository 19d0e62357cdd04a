"""Module maps: how a Flax kernel path becomes PyTorch module names, for PEFT interop.

A `ModuleMap` holds one `ModuleRule` per kind of kernel: the name template (regex groups
and ``{0}``, ``{1}``... for the indices, or `names`, along the kernel's stack axes), the
transpose, the flattening of multi-axis kernels (head-major), the split of fused kernels,
and expert stacks as PEFT's ``target_parameters``. `lora_jax.peft.export_adapter` and
`lora_jax.peft.import_adapter` use it through `lora_jax.peft._slots`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

import numpy as np

from lora_jax.core._layout import Layout
from lora_jax.peft._slots import module_slots, unsupported_reason

__all__ = ["ModuleMap", "ModuleRule"]

KINDS = (None, "linear", "embedding", "parameter")


@dataclasses.dataclass(frozen=True)
class ModuleRule:
    """How the Flax kernels whose path matches `pattern` become PyTorch modules.

    Attributes:
        pattern: a regex that must match the whole `/`-joined Flax path.
        module: the PyTorch module name template (without ``base_model.model.``), or a
            tuple of them to split a fused kernel along its flattened output; for kind
            ``"parameter"``, the full name of one ``nn.Parameter``. Groups of `pattern`
            expand as in `re.Match.expand` (``\\1``, ``\\g<name>``); ``{0}``, ``{1}``...
            stand for the indices along the kernel's stack axes (in `Layout.stack_axes`
            order: scanned layers, stacked projections), and each stack axis needs its
            placeholder (all but the experts axis, for a ``"parameter"``).
        sizes: widths of the parts of a fused kernel along its flattened output, one per
            template; None splits it into equal parts.
        kind: ``"linear"`` or ``"embedding"`` (PEFT's tensor names), or ``"parameter"``:
            an expert stack whose *last* stack axis holds the experts becomes one 3-D
            ``nn.Parameter`` that PEFT adapts through ``target_parameters``. None takes
            ``"embedding"`` for an ``embed`` layout and ``"linear"`` otherwise.
        names: ``{placeholder: names}``: placeholder ``{i}`` becomes ``names[i][index]``
            instead of the index, e.g. for a stack axis that holds different projections
            (one adapter per slice of a ``(2, d, heads, head_dim)`` k/v kernel, exported
            as separate ``k_proj`` / ``v_proj`` modules). Its length must be the axis size.
        parameter_order: kind ``"parameter"``: the names of the PyTorch module's parameters
            in registration order (``named_parameters(recurse=False)``). PEFT wraps each
            targeted parameter of a module in one more `ParamWrapper`, in that order, and
            the nesting is in the saved keys (the first of two is saved as
            ``experts.base_layer.lora_A.weight``), so it is needed when an adapter holds
            more than one parameter of a module.
        swap_factors: kind ``"parameter"``: PEFT takes axis 2 of an ``(E, d1, d2)``
            parameter as the input of its ``lora_A`` (axis 1 when the module sets
            ``is_transposed``): the Flax kernel's input for transformers' experts
            (Qwen3Moe, Mixtral ``(E, out, in)``; GptOss ``(E, in, out)`` with
            ``is_transposed``). True where it is the Flax output (a module that stores
            ``(E, in, out)`` without ``is_transposed``, e.g. Llama4): ``lora_A`` then
            holds our b and ``lora_B`` our a.

    Example:
        >>> import lora_jax as lj
        >>> rule = lj.peft.ModuleRule(
        ...     r"params/layers_(\\d+)/(\\w+)/kernel", r"model.layers.\\1.\\2"
        ... )
        >>> lj.peft.ModuleMap((rule,)).modules_for("params/layers_3/fc/kernel", (8, 4))
        ['model.layers.3.fc']

        One adapter per slice of a k/v kernel ``(2, d, heads, head_dim)`` (its axis 0 a
        stack axis), as two PEFT modules:

        >>> kv = lj.peft.ModuleRule(r"params/layers_(\\d+)/attn/kv",
        ...     r"model.layers.\\1.self_attn.{0}", names={0: ("k_proj", "v_proj")})
        >>> layout = lj.Layout("einsum", (1,), (2, 3), stack_axes=(0,))
        >>> kv_map = lj.peft.ModuleMap((kv,))
        >>> kv_map.modules_for("params/layers_0/attn/kv", (2, 8, 2, 4), layout)
        ['model.layers.0.self_attn.k_proj', 'model.layers.0.self_attn.v_proj']

        Expert kernels ``(experts, in, out)`` as Qwen3Moe's ``gate_up_proj`` parameters:

        >>> experts = lj.peft.ModuleRule(r"params/layers_(\\d+)/moe/gate_up",
        ...     r"model.layers.\\1.mlp.experts.gate_up_proj", kind="parameter",
        ...     parameter_order=("gate_up_proj", "down_proj"))
        >>> layout = lj.Layout("einsum", (1,), (2,), stack_axes=(0,))
        >>> moe_map = lj.peft.ModuleMap((experts,))
        >>> moe_map.modules_for("params/layers_1/moe/gate_up", (4, 8, 6), layout)
        ['model.layers.1.mlp.experts.gate_up_proj']
    """

    pattern: str
    module: str | tuple[str, ...]
    sizes: tuple[int, ...] | None = None
    kind: str | None = None
    names: Mapping[int, Sequence[str]] | tuple[tuple[int, tuple[str, ...]], ...] = ()
    parameter_order: tuple[str, ...] | None = None
    swap_factors: bool = False

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
        if self.kind not in KINDS:
            raise ValueError(f"ModuleRule `kind` must be one of {KINDS}; found {self.kind!r}.")
        object.__setattr__(self, "names", _checked_names(self.names))
        self._check_parameter_fields(modules)

    def _check_parameter_fields(self, modules: tuple[str, ...]) -> None:
        if self.kind != "parameter":
            if self.parameter_order is not None or self.swap_factors:
                raise ValueError(
                    "ModuleRule `parameter_order` and `swap_factors` are for kind "
                    f"'parameter'; this rule has kind {self.kind!r}."
                )
            return
        if len(modules) > 1:
            raise ValueError(
                f"a 'parameter' ModuleRule names one nn.Parameter; found {modules!r} (PEFT's "
                "target_parameters adapts each parameter on its own, with its own A)."
            )
        if self.parameter_order is not None:
            order = self.parameter_order
            ok = not isinstance(order, str) and all(isinstance(n, str) and n for n in order)
            if not ok or len(set(order)) != len(order):
                raise ValueError(
                    "ModuleRule `parameter_order` must be distinct parameter names (as "
                    f"`named_parameters(recurse=False)` lists them); found {order!r}."
                )
            object.__setattr__(self, "parameter_order", tuple(order))

    @property
    def templates(self) -> tuple[str, ...]:
        """The module name templates, as a tuple."""
        return (self.module,) if isinstance(self.module, str) else tuple(self.module)


def _checked_names(names: object) -> tuple[tuple[int, tuple[str, ...]], ...]:
    """`names` as sorted ``(placeholder, names)`` pairs; a ValueError when malformed."""
    pairs = names.items() if isinstance(names, Mapping) else names
    out = []
    for pair in pairs:  # type: ignore[attr-defined]
        i, labels = pair
        ok_key = isinstance(i, int | np.integer) and not isinstance(i, bool) and i >= 0
        ok = not isinstance(labels, str) and all(isinstance(n, str) and n for n in labels)
        if not ok_key or not ok or not labels or len(set(labels)) != len(labels):
            raise ValueError(
                "ModuleRule `names` must map placeholder numbers (ints >= 0) to distinct "
                f"non-empty names, e.g. {{0: ('k_proj', 'v_proj')}}; found {names!r}."
            )
        out.append((int(i), tuple(labels)))
    return tuple(sorted(out))


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
            The module names (several for a stacked or fused kernel; parameter names for
            a ``"parameter"`` rule); empty when no rule matches.

        Raises:
            ValueError: the path is `unsupported`, or the rule does not fit the kernel.
        """
        reason = unsupported_reason(self, path)
        if reason is not None:
            raise ValueError(f"{path}: {reason}")
        return list(module_slots(self, path, tuple(shape), layout) or {})
