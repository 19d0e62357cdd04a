"""Flax NNX: adapters in place on a model (``nnx.LoRAParam``), or the pure form on a graphdef.

    >>> import lora_jax as lj
    >>> sorted(lj.nnx.__all__)
    ['add_lora', 'infer_layouts', 'lora_apply', 'lora_state', 'remove_lora', 'routes']
"""

from lora_jax.nnx._inplace import add_lora, infer_layouts, lora_state, remove_lora
from lora_jax.nnx._pure import lora_apply_nnx as lora_apply
from lora_jax.nnx._pure import routes_nnx as routes

__all__ = ["add_lora", "infer_layouts", "lora_apply", "lora_state", "remove_lora", "routes"]
