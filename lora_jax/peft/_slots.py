"""Slots: where each PyTorch module's (or parameter's) adapter sits in a Flax kernel, as a
`ModuleMap` says, and the key under which PEFT saves it.

A kernel gives one `Slot` per index along its stack axes (scanned layers, stacked
projections) and per part of a fused output; a ``"parameter"`` rule keeps the experts axis
(the last stack axis) whole, as PEFT's ``target_parameters`` does.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
import string
import typing

import numpy as np

from lora_jax.core._layout import Layout, matrix_layout

if typing.TYPE_CHECKING:
    from lora_jax.peft._module_map import ModuleMap, ModuleRule

__all__ = ["Slot", "module_slots", "unsupported_reason", "file_names", "listing"]


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one PyTorch module's adapter sits in a Flax kernel."""

    path: str
    index: tuple[int, ...]  # along the stack axes (all but the experts axis of a parameter)
    start: int  # slice of the flattened output
    stop: int
    kind: str  # "linear", "embedding" or "parameter"
    layout: Layout
    shape: tuple[int, ...]  # of the whole Flax kernel
    swap: bool = False  # parameter: PEFT's lora_A side is the kernel's output
    order: tuple[str, ...] | None = None  # parameter: its module's parameters, in order

    @property
    def experts(self) -> int:
        """The number of experts of a ``"parameter"`` slot (its last stack axis)."""
        return self.layout.sizes(self.shape)[0][-1]


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
    kind = rule.kind or ("embedding" if layout.kind == "embed" else "linear")
    if kind == "parameter" and not stack:
        raise ValueError(
            f"{path}: a 'parameter' rule needs an experts axis (the last stack axis); the "
            f"layout {layout} has no stack axes."
        )
    named = stack[:-1] if kind == "parameter" else stack
    templates = [match.expand(t) for t in rule.templates]
    sizes = rule.sizes or _equal_parts(path, math.prod(outs), len(templates))
    if sum(sizes) != math.prod(outs):
        raise ValueError(
            f"{path}: the rule's sizes {sizes} sum to {sum(sizes)}, but the kernel's "
            f"flattened output has {math.prod(outs)} features."
        )
    besides = " besides its experts axis" if kind == "parameter" else ""
    for template in templates:
        _check_placeholders(path, template, len(named), besides)
    labels = _labels(path, rule, named, layout)
    slots = {}
    for index in np.ndindex(*named):
        start = 0
        for template, size in zip(templates, sizes, strict=True):
            name = template.format(*(axis[i] for axis, i in zip(labels, index, strict=True)))
            slot = Slot(path, index, start, start + size, kind, layout, shape)
            if kind == "parameter":
                slot = _parameter_slot(path, name, slot, rule)
            slots[name] = slot
            start += size
    return slots


def _labels(
    path: str, rule: ModuleRule, named: tuple[int, ...], layout: Layout
) -> list[tuple[str, ...] | range]:
    """What each placeholder stands for: `rule.names` for its axis, else the indices."""
    names = dict(typing.cast(tuple[tuple[int, tuple[str, ...]], ...], rule.names))
    extra = sorted(i for i in names if i >= len(named))
    if extra:
        raise ValueError(
            f"{path}: ModuleRule `names` has placeholder {extra[0]}, but the kernel has "
            f"{len(named)} named stack axes (layout {layout})."
        )
    for i, labels in names.items():
        if len(labels) != named[i]:
            raise ValueError(
                f"{path}: ModuleRule `names[{i}]` has {len(labels)} names {labels}, but stack "
                f"axis {i} (kernel axis {layout.stack_axes[i]}) has size {named[i]}."
            )
    return [names.get(i, range(n)) for i, n in enumerate(named)]


def _parameter_slot(path: str, name: str, slot: Slot, rule: ModuleRule) -> Slot:
    owner, _, attr = name.rpartition(".")
    if not owner:
        raise ValueError(
            f"{path}: a 'parameter' rule names `<module>.<parameter>`; found {name!r}."
        )
    order = rule.parameter_order
    if order is not None and attr not in order:
        raise ValueError(
            f"{path}: parameter {attr!r} of {name!r} is not in the rule's `parameter_order` "
            f"{order}."
        )
    return dataclasses.replace(slot, swap=rule.swap_factors, order=order)


def file_names(slots: typing.Mapping[str, Slot]) -> dict[str, str]:
    """``{name: key stem}``: what PEFT saves each module's (or parameter's) tensors under.

    A module is saved under its name. PEFT wraps the targeted parameters of one module in
    nested ``ParamWrapper`` s, in the module's registration order, so the parameter
    registered last is saved under the module's name and each earlier one under one more
    ``.base_layer`` (`peft/tuners/tuners_utils.py`, ``_inject_parameters``).
    """
    stems = {n: n for n, s in slots.items() if s.kind != "parameter"}
    owners: dict[str, list[str]] = {}
    for name, slot in slots.items():
        if slot.kind == "parameter":
            owners.setdefault(name.rpartition(".")[0], []).append(name)
    for owner, names in owners.items():
        if len(names) > 1 and any(slots[n].order is None for n in names):
            raise ValueError(
                f"the PyTorch module {owner} gets LoRA on several parameters "
                f"({', '.join(sorted(names))}); PEFT nests them in the module's registration "
                "order and the nesting is in the saved keys: give their ModuleRules "
                "`parameter_order` (the module's `named_parameters(recurse=False)` names)."
            )
        orders = {slots[n].order for n in names}
        if len(orders) > 1:
            raise ValueError(
                f"the rules of the parameters of {owner} give different `parameter_order`s: "
                f"{sorted(orders, key=str)}."
            )
        ranked = sorted(names, key=lambda n: _position(slots[n], n))
        for depth, name in enumerate(reversed(ranked)):
            stems[name] = owner + ".base_layer" * depth
    counts = collections.Counter(stems.values())
    clash = sorted(n for n, s in stems.items() if counts[s] > 1)
    if clash:
        raise ValueError(f"these modules would be saved under one key:{listing(clash)}")
    return stems


def _position(slot: Slot, name: str) -> int:
    """The parameter's place in its module's registration order (0 when not given)."""
    order, attr = slot.order or (), name.rpartition(".")[2]
    return order.index(attr) if attr in order else 0


def _equal_parts(path: str, width: int, n: int) -> tuple[int, ...]:
    if width % n:
        raise ValueError(f"{path}: {width} output features do not split into {n} equal parts.")
    return (width // n,) * n


def _check_placeholders(path: str, template: str, n_stack: int, besides: str) -> None:
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as err:
        raise ValueError(f"{path}: module template {template!r} is malformed: {err}.") from err
    want = {str(i) for i in range(n_stack)}
    if fields != want:
        raise ValueError(
            f"{path}: module template {template!r} has placeholders {sorted(fields)}, but the "
            f"kernel has {n_stack} stack axes{besides} and needs exactly {sorted(want)} (one "
            f"module per index along them)."
        )


def listing(names: list[str], limit: int = 20) -> str:
    """The names one per indented line (at most `limit`), for error messages."""
    more = f"\n  ... ({len(names) - limit} more)" if len(names) > limit else ""
    return "\n  " + "\n  ".join(names[:limit]) + more
