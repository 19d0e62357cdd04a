"""One of two processes training together over loopback (gloo), 2 CPU devices each.

Usage: python multiprocess_worker.py PROCESS_ID PORT OUT_DIR STEPS
Writes OUT_DIR/{pmap,mesh}_{PROCESS_ID}.npz with the final adapters.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    # Only when run as a script: pytest imports this module too (doctest collection).
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    pid, port, out, steps = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    jax.distributed.initialize(
        f"127.0.0.1:{port}", num_processes=2, process_id=pid, initialization_timeout=60
    )
    import numpy as np
    from jax.sharding import Mesh
    from problem import batches, loss_fn, optimizer, start, to_numpy

    import lora_jax as lj

    assert jax.device_count() == 4 and jax.local_device_count() == 2
    data = batches(steps)
    half = lambda b: {k: v[pid * len(v) // 2 : (pid + 1) * len(v) // 2] for k, v in b.items()}

    frozen, state = start()
    pmap = lj.parallel.pmap()
    step = lj.make_train_step(loss_fn, optimizer(), strategy=pmap)
    state, rep = pmap.place_state(state, frozen), pmap.place_frozen(frozen)
    for b in data:
        state, _ = step(state, rep, pmap.place_batch(half(b)))
    flat = jax.tree_util.tree_flatten_with_path(to_numpy(pmap.gather(state).lora))[0]
    np.savez(f"{out}/pmap_{pid}.npz", **{jax.tree_util.keystr(k): v for k, v in flat})

    frozen, state = start()
    mesh = lj.parallel.mesh(
        Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "fsdp")), fsdp_axis="fsdp"
    )
    step = lj.make_train_step(loss_fn, optimizer(), strategy=mesh)
    for b in data:  # plain arrays: the mesh step places them
        state, _ = step(state, frozen, half(b))
    gathered = mesh.gather(state.lora)  # a collective for sharded leaves: both processes call it
    for got, want in zip(
        jax.tree.leaves(gathered), jax.tree.leaves(to_numpy(state.lora)), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(got), want)
    flat = jax.tree_util.tree_flatten_with_path(to_numpy(state.lora))[0]
    np.savez(f"{out}/mesh_{pid}.npz", **{jax.tree_util.keystr(k): v for k, v in flat})
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
