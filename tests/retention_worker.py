"""Saves every step with ``max_to_keep=3`` until it is killed (SIGKILL from the test), so
that kills land inside writes and around retention.

Usage: python retention_worker.py CKPT_DIR READY_FILE
Resumes after the folder's latest step (step 1 in an empty folder), writes READY_FILE once
the first step of this run is on disk, then saves the next step, and the next, forever.
Every value saved as step ``s`` is a function of ``s`` alone (`state_at`), so the test can
tell a wrong restore from a right one.
"""

from __future__ import annotations

import sys

MAX_TO_KEEP = 3
# Two kernels with rank-64 adapters: a, b, and Adam's mu and nu of each: 3 MiB of random
# float32 in 16 arrays a step (~2.4 MB on disk); ~11 saves a second on 2 CPU cores, most of
# each spent writing.
KERNELS = {f"w{i}": (1024, 1024) for i in range(2)}
RANK = 64
_TEMPLATE = []


def _template():
    """A fresh state of the right structure (built once per process)."""
    if not _TEMPLATE:
        import jax
        import jax.numpy as jnp
        import optax

        import lora_jax as lj

        config = lj.LoraConfig(rank=RANK, targets="w.*")
        params = {k: jnp.zeros(shape) for k, shape in KERNELS.items()}
        _, lora = lj.split(params, config, key=jax.random.key(0))
        _TEMPLATE.append(lj.TrainState.create(lora, optax.adam(1e-3), key=jax.random.key(0)))
    return _TEMPLATE[0]


def state_at(step: int):
    """The `TrainState` saved as `step`: every float leaf is ``step + noise(step, leaf)``,
    the integer leaves are `step`, the rng is ``key(step)``; returns ``(state, position)``."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    state = _template()
    leaves, treedef = jax.tree.flatten((state.lora, state.opt_state))
    rng = np.random.default_rng(step)
    values = []
    for leaf in leaves:
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            noise = rng.random(leaf.shape, dtype=np.float32)
            values.append(jnp.asarray(np.float32(step) + noise, leaf.dtype))
        else:
            values.append(jnp.full(leaf.shape, step, leaf.dtype))
    lora, opt_state = jax.tree.unflatten(treedef, values)
    state = state.replace(
        step=jnp.asarray(step, jnp.int32),
        lora=lora,
        opt_state=opt_state,
        rng=jax.random.key(step),
        skipped=jnp.asarray(step % 7, jnp.int32),
    )
    return state, {"step": step}


def main() -> None:
    import lora_jax as lj

    directory, ready = sys.argv[1:3]
    mgr = lj.CheckpointManager(directory, max_to_keep=MAX_TO_KEEP)
    first = step = (mgr.latest_step() or 0) + 1
    while True:  # until killed (never closed; each save deletes what retention set aside)
        state, position = state_at(step)
        mgr.save(step, state, data_position=position)
        mgr.wait_until_finished()
        if step == first:
            open(ready, "w").close()
        step += 1


if __name__ == "__main__":
    main()
