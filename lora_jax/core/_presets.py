"""Target presets: named sets of kernels (``"attention"``, ``"all-linear"``) a config can
target instead of a regex."""

from __future__ import annotations

import re

__all__ = ["PRESETS", "PRESET_FNS"]

_ATTN_IN = r"query|key|value|q_proj|k_proj|v_proj|qkv|qkv_proj|query_key_value|wq|wk|wv|wqkv|q|k|v"
_ATTN_OUT = r"out|o_proj|out_proj|wo|o|dense|c_proj"
_HEADS = r"lm_head|head|logits|classifier|unembed|output_head|score"
PRESETS = {
    "attention": (
        "query/key/value projections (query, key, value, q_proj, k_proj, v_proj, qkv, wq, ...) "
        "and the attention output (out, o_proj, out_proj, wo, ...) under a module whose name "
        "contains 'attn' or 'attention'; `kernel` leaves only"
    ),
    "all-linear": (
        f"every dense kernel (leaf `kernel`, not an embedding or a conv), except output heads "
        f"({_HEADS.replace('|', ', ')})"
    ),
}


def _preset_attention(path: str, kind: str) -> bool:
    parts = path.split("/")
    if len(parts) < 2 or parts[-1] != "kernel" or kind in ("conv", "embed"):
        return False
    name = parts[-2]
    if re.fullmatch(_ATTN_IN, name):
        return True
    in_attn = any(re.search("attn|attention", p, re.IGNORECASE) for p in parts[:-2])
    return bool(re.fullmatch(_ATTN_OUT, name)) and in_attn


def _preset_all_linear(path: str, kind: str) -> bool:
    parts = path.split("/")
    if parts[-1] != "kernel" or kind in ("conv", "embed"):
        return False
    return not any(re.fullmatch(_HEADS, p) for p in parts[:-1])


PRESET_FNS = {"attention": _preset_attention, "all-linear": _preset_all_linear}
