"""The lora_jax fine-tuning app (a thin user of the public `lora_jax` API)."""
