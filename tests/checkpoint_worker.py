"""One of two processes saving and restoring together over loopback (gloo), 2 CPU devices each.

Usage: python checkpoint_worker.py PROCESS_ID PORT DIR
Trains a few mesh-sharded steps with the adapters' rows sharded across the two processes,
saves every step with a `CheckpointManager` (max_to_keep=2, so retention deletes), restores
onto the same shardings and onto replicated ones, saves the adapter with `save_adapter` and
loads it back. Writes DIR/result_PROCESS_ID.npz (everything gathered to the host) and
DIR/steps_PROCESS_ID.txt.
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
    pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(
        f"127.0.0.1:{port}", num_processes=2, process_id=pid, initialization_timeout=60
    )
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from problem import batches, loss_fn, optimizer, start

    import lora_jax as lj

    assert jax.device_count() == 4 and jax.local_device_count() == 2
    # fsdp spans the processes: each process holds half of every sharded adapter.
    devices = np.array(jax.devices()).reshape(2, 2).T
    mesh = Mesh(devices, ("data", "fsdp"))
    strategy = lj.parallel.mesh(mesh, fsdp_axis="fsdp")
    frozen, state = start()
    step = lj.make_train_step(loss_fn, optimizer(), strategy=strategy)
    half = lambda b: {k: v[pid * len(v) // 2 : (pid + 1) * len(v) // 2] for k, v in b.items()}

    gather = lambda tree: jax.tree.map(
        lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree
    )
    arrays = lambda s: gather({"lora": s.lora, "opt_state": s.opt_state, "step": s.step})
    saved = {}
    with lj.CheckpointManager(f"{out}/ckpt", max_to_keep=2) as mgr:
        for i, b in enumerate(batches(4), start=1):
            state, _ = step(state, frozen, half(b))
            mgr.save(i, state, data_position={"step": i})
            saved[i] = arrays(state)
        mgr.wait_until_finished()
        steps = mgr.all_steps()
        sharded = [
            not x.is_fully_addressable and not x.sharding.is_fully_replicated
            for x in jax.tree.leaves(state.lora)
        ]
        assert any(sharded), "no adapter is sharded across the processes"
        restored, position = mgr.restore(state)  # onto the training shardings
        earlier, _ = mgr.restore(state, steps[0])
        replicated = NamedSharding(mesh, PartitionSpec())
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state
        )
        target = target.replace(rng=state.rng)
        onto_replicated, _ = mgr.restore(target)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        assert a.sharding == b.sharding, (a.sharding, b.sharding)
    assert all(x.sharding == replicated for x in jax.tree.leaves(onto_replicated.lora))

    lj.save_adapter(f"{out}/adapter", state.lora, frozen=frozen)
    loaded = lj.load_adapter(f"{out}/adapter", frozen=frozen, sharding=replicated, strict=True)
    assert all(x.sharding == replicated for x in jax.tree.leaves(loaded))
    lj.save_adapter(f"{out}/adapter", loaded, overwrite=True)  # replicated input, overwrite

    result = {"position": np.asarray(position["step"])}
    for name, tree in {
        "latest": arrays(restored),
        "earlier": arrays(earlier),
        "replicated": arrays(onto_replicated),
        "saved_latest": saved[steps[-1]],
        "saved_earlier": saved[steps[0]],
        "loaded": gather(loaded),
        "lora": gather(state.lora),
    }.items():
        for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            result[name + jax.tree_util.keystr(kp)] = np.asarray(leaf)
    np.savez(f"{out}/result_{pid}.npz", **result)
    with open(f"{out}/steps_{pid}.txt", "w") as f:
        f.write(" ".join(map(str, steps)))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
