"""Small test helpers shared by several test modules."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np


def perturb(lora, key, scale=0.1):
    """Random non-zero values in every a and b (so the low-rank path is visible)."""
    leaves, treedef = jax.tree_util.tree_flatten(lora)
    keys = jax.random.split(key, len(leaves))
    new = [
        x + scale * jax.random.normal(k, x.shape, x.dtype)
        for x, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, new)


def as_f64(x):
    return np.asarray(jnp.asarray(x, jnp.float32), dtype=np.float64)


def assert_tree_close(got, want, tol=1e-5):
    """Every leaf of `got` within ``tol * (1 + max|want|)`` of `want` (a float64 NumPy
    reference is compared as it is)."""
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        w = np.asarray(w, np.float64) if isinstance(w, np.ndarray) else as_f64(w)
        np.testing.assert_allclose(as_f64(g), w, rtol=tol, atol=tol * (1.0 + np.abs(w).max()))


def check_against_merged(apply, base, frozen, lora, *args, tol=1e-5):
    """``apply(frozen, lora, *args)`` equals ``base(lj.merge(frozen, lora), *args)``, and so
    do their gradients w.r.t. `lora` (under one random cotangent), each path jitted.
    Returns the output of `apply`."""
    import lora_jax as lj

    def value_and_grad(fn):
        def run(lo, f, a):
            y, pull = jax.vjp(lambda lo_: fn(f, lo_, *a), lo)
            return y, pull(jax.random.normal(jax.random.key(99), y.shape, y.dtype))[0]

        return jax.jit(run)(lora, frozen, args)

    y, g = value_and_grad(apply)
    y_merged, g_merged = value_and_grad(lambda f, lo, *a: base(lj.merge(f, lo), *a))
    assert_tree_close(y, y_merged, tol)
    assert_tree_close(g, g_merged, tol)
    assert all(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(g))
    return y


_CONTRACTION = re.compile(r"= \(?\w+\[([\d,]*)\][^=]*? (?:dot|convolution|custom-call)\(")


def contraction_sizes(hlo):
    """Element counts of the results of every dot, convolution and custom call in compiled
    HLO text, fused computations included (XLA's CPU backend lowers `lax.ragged_dot` to
    dots on group-masked operands, so those are found too)."""
    return [math.prod(int(d) for d in dims.split(",") if d) for dims in _CONTRACTION.findall(hlo)]


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(worker: str, *args: str, timeout: float = 240) -> None:
    """Runs ``python worker PROCESS_ID PORT *args`` as two processes that meet over
    loopback (each sets its own XLA_FLAGS); asserts both exit 0, showing the output of one
    that does not."""
    import os
    import subprocess
    import sys

    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [
        subprocess.Popen(
            [sys.executable, worker, str(i), port, *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=timeout)[0].decode() for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
