"""The benchmark's parts; `python -m train.benchmark` runs them."""
