"""Tiny random transformers models for the parity tests: PyTorch and transformers are
imported only when a model is made (the interop extra)."""

from __future__ import annotations

from typing import Any

import numpy as np


def random_model(config: Any, *, norm_offset: bool = True) -> Any:
    """An eval-mode causal LM of a transformers `config` with every weight drawn (seed 0):
    ``0.15·N(0, 1)``, plus 1 on the ``*norm.weight``s with `norm_offset` (norms near 1;
    Gemma's scale by ``1 + w`` and need no offset)."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            offset = 1.0 if norm_offset and name.endswith("norm.weight") else 0.0
            p.copy_(0.15 * torch.randn_like(p) + offset)
    return model


def torch_logits(model: Any, ids: Any) -> np.ndarray:
    """The model's float32 logits for the token ids (a NumPy array)."""
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(ids))).logits.float().numpy()


def require_interop() -> tuple[Any, Any]:
    """torch and transformers, or the calling test module is skipped (the interop extra);
    PyTorch on one thread and transformers' logging and progress bars quiet."""
    import pytest

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return torch, transformers
