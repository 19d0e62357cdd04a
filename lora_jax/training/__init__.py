"""The training step: `TrainState` and `make_train_step` (re-exported at the top)."""

from lora_jax.training._step import TrainState, make_train_step

__all__ = ["TrainState", "make_train_step"]
