"""One of two processes training k stacked adapters together (`lj.multi.make_train_step`)
over loopback (gloo), 2 CPU devices each.

Usage: python multi_adapter_worker.py PROCESS_ID PORT OUT_DIR STEPS
Writes OUT_DIR/{pmap,mesh}_{PROCESS_ID}.npz with the final stacked adapters.
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
    from problem import multi_batches, multi_loss_fn, multi_start, optimizer, to_numpy

    import lora_jax as lj

    data = multi_batches(steps)
    half = lambda b: {k: v[pid * len(v) // 2 : (pid + 1) * len(v) // 2] for k, v in b.items()}
    devices = np.array(jax.devices())
    strategies = {
        "pmap": lj.parallel.pmap(),
        "mesh": lj.parallel.mesh(Mesh(devices.reshape(2, 2), ("data", "fsdp")), fsdp_axis="fsdp"),
    }
    for name, strategy in strategies.items():
        frozen, state = multi_start()
        step = lj.multi.make_train_step(multi_loss_fn, optimizer(), strategy=strategy)
        state, base = strategy.place_state(state, frozen), strategy.place_frozen(frozen)
        for b in data:
            state, _ = step(state, base, strategy.place_batch(half(b)))
        lora = to_numpy(strategy.gather(state).lora if name == "pmap" else state.lora)
        flat = jax.tree_util.tree_flatten_with_path(lora)[0]
        np.savez(f"{out}/{name}_{pid}.npz", **{jax.tree_util.keystr(k): v for k, v in flat})
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
