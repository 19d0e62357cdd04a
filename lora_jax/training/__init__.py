"""The training step: `TrainState` and `make_train_step` (re-exported at the top).

>>> import lora_jax as lj
>>> lj.training.make_train_step is lj.make_train_step
True
"""

from lora_jax.training._state import TrainState
from lora_jax.training._step import make_train_step

__all__ = ["TrainState", "make_train_step"]
