"""Training-step variants, timed side by side: full fine-tuning, lora_jax (linen and NNX,
factored and merged, on stock layers and on custom einsum modules), flax's
`nnx.LoRALinear`, and the floor of any adapter method."""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx

import lora_jax as lj
from train.bench.models import GPT, RANK, CustomGPT, GPTConfig, NnxGPT, lm_loss

QV = r".*/attn/(query|value)/kernel"
ALL_LINEAR = r".*/(attn/(query|key|value|out)|mlp/(up|down))/kernel"
NNX_ALL_LINEAR = ("query", "key", "value", "out", "up", "down")
NNX_ALL_LINEAR_PATTERN = r".*/(query|key|value|out|up|down)/kernel"
CUSTOM_QV = r".*/attn/(query|value)"  # `CustomGPT`'s raw params have no `/kernel` suffix
CUSTOM_ALL_LINEAR = r".*/(attn/(query|key|value|out)|mlp/(up|down))"
STOCK_ROUTE = "factored (Dense)"  # the route every adapter must take in each model
CUSTOM_ROUTE = "factored (dot_general)"
DORA_ROUTE = "factored (dot_general, DoRA)"  # DoRA adapters run through the rewrite


def _bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


@dataclasses.dataclass
class Runner:
    """One benchmarked variant: a zero-argument step that blocks until done."""

    name: str
    run: Callable[[], None]
    trainable: int
    trainable_bytes: int
    opt_bytes: int
    times: list[float] = dataclasses.field(default_factory=list)
    compile_s: float = 0.0
    calls: int = 0  # serving runners: calls made and traces their jitted function took
    traces: int = 0


def full_runner(model: nn.Module, variables: dict, ids: jax.Array, name: str = "") -> Runner:
    tx = optax.adamw(1e-4)
    params = jax.tree.map(jnp.array, variables)  # own buffers: they are donated
    state = {"params": params, "opt": tx.init(params)}

    @functools.partial(jax.jit, donate_argnums=(0, 1))  # as the LoRA step donates its state
    def step(params, opt_state, ids):
        loss, grads = jax.value_and_grad(lambda p: lm_loss(model.apply(p, ids), ids))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def run() -> None:
        state["params"], state["opt"], loss = step(state["params"], state["opt"], ids)
        loss.block_until_ready()

    n = sum(x.size for x in jax.tree.leaves(variables))
    return Runner(name or "full fine-tune", run, n, _bytes(variables), _bytes(state["opt"]))


def require_routes(model: nn.Module, frozen: Any, lora: Any, ids: jax.Array, route: str) -> None:
    """Raises unless `lj.routes` sends every adapter by `route` (or by ``route (...)``:
    ``"factored"`` takes any factored route), so that a factored variant can never
    silently time the merged path."""
    fits = lambda r: r == route or r.startswith(f"{route} (")
    wrong = {p: r for p, r in lj.routes(model.apply, frozen, lora, ids).items() if not fits(r)}
    if wrong:
        raise RuntimeError(f"{type(model).__name__}: adapters not routed {route!r}: {wrong}")


def lora_runner(
    name: str,
    model: nn.Module,
    variables: dict,
    ids: jax.Array,
    targets: str,
    *,
    route: str = STOCK_ROUTE,
    layouts: dict[str, lj.Layout] | None = None,
    merged: bool = False,
    dora: bool = False,
) -> Runner:
    """A LoRA step on `targets`: through `lj.lora_apply` (checked to take `route`), or
    through `lj.merge` with `merged`; DoRA adapters with `dora`."""
    config = lj.LoraConfig(rank=RANK, alpha=16.0, targets=targets, use_dora=dora)
    frozen, lora = lj.split(variables, config, key=jax.random.key(1), layouts=layouts)
    apply = lj.lora_apply(model.apply)
    if not merged:
        require_routes(model, frozen, lora, ids, route)

    def loss_fn(frozen, lora, ids, key):
        if merged:
            return lm_loss(model.apply(lj.merge(frozen, lora), ids), ids)
        return lm_loss(apply(frozen, lora, ids), ids)

    tx = optax.adamw(1e-4)
    step = lj.make_train_step(loss_fn, tx)
    box = {"state": lj.TrainState.create(lora, tx, key=jax.random.key(2))}

    def run() -> None:
        box["state"], metrics = step(box["state"], frozen, ids)
        metrics["loss"].block_until_ready()

    n = sum(x.size for x in jax.tree.leaves(lora))
    return Runner(name, run, n, _bytes(lora), _bytes(box["state"].opt_state))


def custom_runners(cfg: GPTConfig, ids: jax.Array) -> dict[str, Runner]:
    """`CustomGPT`'s variants: the layouts of its raw kernels are read from the einsums
    that use them, and its LoRA steps are checked to route ``factored (dot_general)``
    before they are timed."""
    model = CustomGPT(cfg)
    variables = jax.jit(model.init)(jax.random.key(0), ids)
    layouts = lj.infer_layouts(model.apply, variables, ids)
    lora = lambda name, targets: lora_runner(
        name, model, variables, ids, targets, route=CUSTOM_ROUTE, layouts=layouts
    )
    return {
        "custom full": full_runner(model, variables, ids, "custom-style full fine-tune"),
        "custom qv": lora("custom-style lora q/v", CUSTOM_QV),
        "custom all": lora("custom-style lora all-linear", CUSTOM_ALL_LINEAR),
    }


def floor_runner(model: GPT, variables: dict, ids: jax.Array) -> Runner:
    """The floor of any LoRA step here: forward plus input gradients down to the embedding
    output (a scalar gate on it is the only thing differentiated), no weight gradient, no
    optimizer. No adapter method can beat it on this model."""

    def loss(gate: jax.Array) -> jax.Array:
        def gate_embedding(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            lookup = isinstance(context.module, nn.Embed) and context.method_name == "__call__"
            return out * gate if lookup else out

        with nn.intercept_methods(gate_embedding):
            return lm_loss(model.apply(variables, ids), ids)

    step = jax.jit(jax.value_and_grad(loss))
    gate = jnp.ones(())

    def run() -> None:
        step(gate)[0].block_until_ready()

    return Runner("floor: forward + input grads only", run, 0, 0, 0)


def _nnx_step_runner(name: str, model: nnx.Module, ids: jax.Array) -> Runner:
    """Times the usual NNX LoRA step on `model`: the `nnx.LoRAParam`s split out, the rest
    merged back inside one `jax.jit`, adamw on the LoRA params only, buffers donated (as
    the other steps donate theirs)."""
    parts: tuple[Any, ...] = nnx.split(model, nnx.LoRAParam, ...)
    graphdef, lora, rest = parts
    tx = optax.adamw(1e-4)
    box = {"lora": lora, "opt": tx.init(lora)}

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(lora, opt_state, rest, ids):
        loss, grads = jax.value_and_grad(
            lambda lora: lm_loss(nnx.merge(graphdef, lora, rest)(ids), ids)
        )(lora)
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    def run() -> None:
        box["lora"], box["opt"], loss = step(box["lora"], box["opt"], rest, ids)
        loss.block_until_ready()

    n = sum(x.size for x in jax.tree.leaves(lora))
    return Runner(name, run, n, _bytes(lora), _bytes(box["opt"]))


def nnx_runner(name: str, cfg: GPTConfig, ids: jax.Array, targets: set[str]) -> Runner:
    """flax's own `nnx.LoRALinear` on the named layers of the NNX twin (the in-run peer)."""
    return _nnx_step_runner(name, NnxGPT(cfg, targets, nnx.Rngs(0)), ids)


def nnx_lora_jax_runner(name: str, cfg: GPTConfig, ids: jax.Array) -> Runner:
    """lora_jax on the plain NNX twin, in place (`lj.nnx.add_lora`), trained by the same step."""
    model = NnxGPT(cfg, set(), nnx.Rngs(0))
    config = lj.LoraConfig(rank=RANK, alpha=16.0, targets=NNX_ALL_LINEAR_PATTERN)
    lj.nnx.add_lora(model, config, key=jax.random.key(1))
    return _nnx_step_runner(name, model, ids)


def _ratios(runner: Runner, reference: Runner) -> list[float]:
    return [t / r for t, r in zip(runner.times, reference.times, strict=True)]


def paired(runner: Runner, reference: Runner) -> tuple[float, float, float]:
    """Median, min and max of the per-round ratios ``runner / reference`` (the variants
    alternate within each round, so drift on a shared machine cancels)."""
    ratios = _ratios(runner, reference)
    return statistics.median(ratios), min(ratios), max(ratios)


def paired_gap(
    runner: Runner, reference: Runner, other: Runner, other_reference: Runner
) -> tuple[float, float, float]:
    """Median, min and max of the per-round differences ``runner / reference - other /
    other_reference``: how far one model's ratio is from another's, round by round."""
    gaps = [
        a - b
        for a, b in zip(_ratios(runner, reference), _ratios(other, other_reference), strict=True)
    ]
    return statistics.median(gaps), min(gaps), max(gaps)


def measure(runners: list[Runner], rounds: int) -> None:
    """Compiles each runner, then times them alternating, `rounds` steps each."""
    for r in runners:
        start = time.perf_counter()
        r.run()
        r.compile_s = time.perf_counter() - start
        r.run()  # one more warm step
    for i in range(rounds):
        for r in runners:
            start = time.perf_counter()
            r.run()
            r.times.append(time.perf_counter() - start)
        print(
            f"  round {i + 1}/{rounds}: "
            + ", ".join(f"{r.name} {r.times[-1]:.3f}s" for r in runners),
            flush=True,
        )
