"""Loaded by pytest before anything imports JAX: four simulated CPU devices for every test,
so the pmap and mesh strategies run on a laptop (set XLA_FLAGS yourself to override)."""

import os
import tempfile

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()
# Compiled programs are cached on disk and shared by the test workers (and later runs).
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "lora_jax_xla_cache")
)

# `python -m train`'s entry point runs the app when imported; doctest collection must not.
collect_ignore = ["train/__main__.py"]
