"""Loaded by pytest before anything imports JAX: four simulated CPU devices for every test,
so the pmap and mesh strategies run on a laptop (set XLA_FLAGS yourself to override)."""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()
