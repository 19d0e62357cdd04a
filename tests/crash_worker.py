"""Saves a large adapter state again and again until it is killed (SIGKILL from the test).

Usage: python crash_worker.py CKPT_DIR READY_FILE
Writes READY_FILE after step 1 is complete, then keeps saving steps 2, 3, ...
"""

from __future__ import annotations

import sys


def main() -> None:
    import jax
    import jax.numpy as jnp
    import optax

    import lora_jax as lj

    directory, ready = sys.argv[1:3]
    config = lj.LoraConfig(rank=256, targets="w")
    _, lora = lj.split({"w": jnp.zeros((4096, 4096))}, config, key=jax.random.key(0))
    state = lj.TrainState.create(lora, optax.adam(1e-3), key=jax.random.key(1))
    with lj.CheckpointManager(directory, max_to_keep=100) as mgr:
        step = 1
        while True:
            state = state.replace(step=jnp.asarray(step, jnp.int32))
            mgr.save(step, state, data_position={"step": step})
            mgr.wait_until_finished()
            if step == 1:
                open(ready, "w").close()
            step += 1


if __name__ == "__main__":
    main()
