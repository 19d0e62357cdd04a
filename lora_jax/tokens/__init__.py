"""Trainable token rows (PEFT's ``trainable_token_indices``): train only chosen rows of an
embedding table, and of a tied or untied output head, with optimizer state for those rows
alone and every other row frozen.

`select` makes ``{path: TokenRows}`` from the base, `apply` writes them into the frozen
tables (inside `jax.grad`: the gradient reaches the rows only; outside: a merge). A tied
head reads the embedding table, so its rows are the embedding's; an untied head kernel
``(dim, vocab)`` is its own path (axis 1). `lora_jax.peft.export_adapter` and
`lora_jax.peft.import_adapter` carry them in PEFT's format (``tokens=``).

    >>> import jax.numpy as jnp, lora_jax as lj
    >>> params = {"params": {"embed": {"embedding": jnp.zeros((8, 4))}}}
    >>> rows = lj.tokens.select(params, {"params/embed/embedding": [6, 7]})
    >>> lj.tokens.apply(params, rows)["params"]["embed"]["embedding"].shape
    (8, 4)
"""

from lora_jax.tokens._rows import TokenRows, apply, select

__all__ = ["TokenRows", "apply", "select"]
