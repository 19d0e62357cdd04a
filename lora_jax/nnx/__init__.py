"""Flax NNX: adapters in place on a model (``nnx.LoRAParam``), or the pure form on a graphdef.

In place: `add_lora` (from a config, or attaching existing adapters), `lora_state` (the
model as ``(frozen, lora)``), `remove_lora`. Pure: `lora_apply` and `routes` on the
graphdef of ``nnx.split(model)``; `lora_apply_mixed` (each example its own adapter).
`infer_layouts` reads every supported layer's kernel layout. Adapters carry their scale
and dropout rate; a config only creates them.

    >>> import lora_jax as lj
    >>> sorted(lj.nnx.__all__)  # doctest: +NORMALIZE_WHITESPACE
    ['add_lora', 'infer_layouts', 'lora_apply', 'lora_apply_mixed', 'lora_state',
     'remove_lora', 'routes']
"""

from lora_jax.nnx._inplace import add_lora, infer_layouts, lora_state, remove_lora
from lora_jax.nnx._mixed import lora_apply_mixed
from lora_jax.nnx._pure import lora_apply, routes

__all__ = [
    "add_lora",
    "infer_layouts",
    "lora_apply",
    "lora_apply_mixed",
    "lora_state",
    "remove_lora",
    "routes",
]
