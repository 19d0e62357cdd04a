"""Parallel training: strategies as values, and placing trees on devices.

A strategy says how `lora_jax.make_train_step` compiles the step and where the state, base
and batch live: `jit()` (one device), `pmap(devices=None)` (a replica per device) or
`mesh(mesh, data_axis="data", fsdp_axis=None)` (`NamedSharding`, optionally FSDP). Each is
a `Strategy`, a NamedTuple of pure functions (as an optax transformation is), so a training
loop asks it to place and gather instead of switching on a name.

    >>> import lora_jax as lj
    >>> strategy = lj.parallel.pmap()
    >>> strategy.axis_name
    'devices'
"""

from lora_jax.parallel._placement import place, replicate, shard_batch, unreplicate
from lora_jax.parallel._shardings import MeshShardings, mesh_shardings
from lora_jax.parallel._strategies import Strategy, jit, mesh, pmap

__all__ = [
    "MeshShardings",
    "Strategy",
    "jit",
    "mesh",
    "mesh_shardings",
    "place",
    "pmap",
    "replicate",
    "shard_batch",
    "unreplicate",
]
