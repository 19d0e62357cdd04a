"""Half of an interrupted run, in its own process: train, checkpoint, or restore and go on.

Usage: python resume_worker.py first|second CKPT_DIR OUT_NPZ
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import jax
    import numpy as np
    from problem import batches, loss_fn, optimizer, start

    import lora_jax as lj

    mode, directory, out = sys.argv[1:4]
    data = batches(20)
    frozen, state = start()
    step = lj.make_train_step(loss_fn, optimizer())
    with lj.CheckpointManager(directory) as mgr:
        if mode == "first":
            for i in range(10):
                state, _ = step(state, frozen, data[i])
            mgr.save(10, state, data_position={"next_batch": 10})
        else:
            state, position = mgr.restore(state, frozen=frozen)
            for i in range(position["next_batch"], 20):
                state, _ = step(state, frozen, data[i])
    flat = jax.tree_util.tree_flatten_with_path(state.lora)[0]
    np.savez(out, **{jax.tree_util.keystr(k): np.asarray(v) for k, v in flat})


if __name__ == "__main__":
    main()
