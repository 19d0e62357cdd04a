"""Placing trees on devices: replicate for pmap, shard batches, mesh shardings.

    >>> import lora_jax as lj
    >>> "replicate" in lj.parallel.__all__
    True
"""

from lora_jax.parallel._placement import (
    MeshShardings,
    mesh_shardings,
    place,
    replicate,
    shard_batch,
    unreplicate,
)

__all__ = ["MeshShardings", "mesh_shardings", "place", "replicate", "shard_batch", "unreplicate"]
