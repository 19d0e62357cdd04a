"""Step-time benchmark: LoRA training steps against full fine-tuning, measured side by side.

Builds a GPT-style decoder (default: 8 layers, d_model 768, 12 heads, vocab 8192, sequence
256, batch 4, float32, adamw) and times, alternating them in one process, one training step
of: full fine-tuning; lora_jax rank 8 on attention q and v; lora_jax on all six linear layers
of each block (q, k, v, out, up, down); the same all-linear targets through the merged
fallback; and flax's own `nnx.LoRALinear` on both target sets, as the in-run peer. It prints
a markdown table of medians and ratios to full fine-tuning.

Targets on a CPU: ratio <= 0.65 for q/v and <= 0.75 for all-linear.

A second table times serving with many adapters (all-linear, rank 8): the forward pass of
the base, of one adapter swapped for another at every call (`lora_apply`), and of a mixed
batch where each example uses one of 4 adapters (`lora_apply_mixed`), with the number of
traces each jitted function took over all its calls (1 means swapping never recompiled).
Target: a mixed batch at most 1.2x the one-adapter forward.

Usage::

    python -m train.benchmark                 # the medium model (minutes on 2 CPU cores)
    python -m train.benchmark --preset tiny   # a smoke run (seconds)
    python -m train.benchmark --part serving  # only the serving table
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import platform
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


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    layers: int = 8
    d_model: int = 768
    heads: int = 12
    vocab: int = 8192
    seq: int = 256
    batch: int = 4


PRESETS = {
    "medium": GPTConfig(),
    "tiny": GPTConfig(layers=2, d_model=64, heads=4, vocab=256, seq=32, batch=2),
}
RANK = 8
QV = r".*/attn/(query|value)/kernel"
ALL_LINEAR = r".*/(attn/(query|key|value|out)|mlp/(up|down))/kernel"
NNX_ALL_LINEAR = ("query", "key", "value", "out", "up", "down")
TARGETS = {"lora q/v": 0.65, "lora all-linear": 0.75}


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int) -> jax.Array:
    """Multi-head causal self-attention on (batch, seq, d_model) projections."""
    b, t, d = q.shape
    split = lambda x: x.reshape(b, t, heads, d // heads)
    logits = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k)) / jnp.sqrt(d // heads)
    mask = jnp.tril(jnp.ones((t, t), bool))
    weights = jax.nn.softmax(jnp.where(mask, logits, -1e9), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, split(v)).reshape(b, t, d)


class Attention(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = self.cfg.d_model
        q, k, v = (nn.Dense(d, name=n)(x) for n in ("query", "key", "value"))
        return nn.Dense(d, name="out")(causal_attention(q, k, v, self.cfg.heads))


class Mlp(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.gelu(nn.Dense(4 * self.cfg.d_model, name="up")(x))
        return nn.Dense(self.cfg.d_model, name="down")(h)


class Block(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + Attention(self.cfg, name="attn")(nn.LayerNorm(name="ln1")(x))
        return x + Mlp(self.cfg, name="mlp")(nn.LayerNorm(name="ln2")(x))


class GPT(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        x = nn.Embed(self.cfg.vocab, self.cfg.d_model, name="embed")(ids)
        x = x + self.param("pos", nn.initializers.normal(0.02), (self.cfg.seq, self.cfg.d_model))
        for i in range(self.cfg.layers):
            x = Block(self.cfg, name=f"block_{i}")(x)
        return nn.Dense(self.cfg.vocab, name="lm_head")(nn.LayerNorm(name="ln_f")(x))


class NnxBlock(nnx.Module):
    """The same block in NNX, with `nnx.LoRALinear` on the named targets."""

    def __init__(self, cfg: GPTConfig, targets: set[str], rngs: nnx.Rngs):
        d = cfg.d_model

        def linear(name: str, n_in: int, n_out: int) -> nnx.Module:
            if name in targets:
                return nnx.LoRALinear(n_in, n_out, lora_rank=RANK, rngs=rngs)
            return nnx.Linear(n_in, n_out, rngs=rngs)

        self.heads = cfg.heads
        self.ln1, self.ln2 = nnx.LayerNorm(d, rngs=rngs), nnx.LayerNorm(d, rngs=rngs)
        self.query, self.key, self.value = (linear(n, d, d) for n in ("query", "key", "value"))
        self.out = linear("out", d, d)
        self.up, self.down = linear("up", d, 4 * d), linear("down", 4 * d, d)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.ln1(x)
        x = x + self.out(causal_attention(self.query(h), self.key(h), self.value(h), self.heads))
        return x + self.down(nnx.gelu(self.up(self.ln2(x))))


class NnxGPT(nnx.Module):
    def __init__(self, cfg: GPTConfig, targets: set[str], rngs: nnx.Rngs):
        self.embed = nnx.Embed(cfg.vocab, cfg.d_model, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.seq, cfg.d_model)))
        self.blocks = nnx.List([NnxBlock(cfg, targets, rngs) for _ in range(cfg.layers)])
        self.ln_f = nnx.LayerNorm(cfg.d_model, rngs=rngs)
        self.lm_head = nnx.Linear(cfg.d_model, cfg.vocab, rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        x = self.embed(ids) + self.pos[...]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def lm_loss(logits: Any, ids: jax.Array) -> jax.Array:
    """Next-token cross-entropy, in float32."""
    logits = logits[:, :-1].astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()


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


def full_runner(model: GPT, variables: dict, ids: jax.Array) -> Runner:
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
    return Runner("full fine-tune", run, n, _bytes(variables), _bytes(state["opt"]))


def lora_runner(
    name: str, model: GPT, variables: dict, ids: jax.Array, targets: str, merged: bool = False
) -> Runner:
    config = lj.LoraConfig(rank=RANK, alpha=16.0, targets=targets)
    frozen, lora = lj.split(variables, config, key=jax.random.key(1))
    apply = lj.lora_apply(model.apply, config)

    def loss_fn(frozen, lora, ids, key):
        if merged:
            return lm_loss(model.apply(lj.merge(frozen, lora, config), ids), ids)
        return lm_loss(apply(frozen, lora, ids), ids)

    tx = optax.adamw(1e-4)
    step = lj.make_train_step(loss_fn, tx)
    box = {"state": lj.TrainState.create(lora, tx, key=jax.random.key(2))}

    def run() -> None:
        box["state"], metrics = step(box["state"], frozen, ids)
        metrics["loss"].block_until_ready()

    n = sum(x.size for x in jax.tree.leaves(lora))
    return Runner(name, run, n, _bytes(lora), _bytes(box["state"].opt_state))


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


def nnx_runner(name: str, cfg: GPTConfig, ids: jax.Array, targets: set[str]) -> Runner:
    model = NnxGPT(cfg, targets, nnx.Rngs(0))
    parts: tuple[Any, ...] = nnx.split(model, nnx.LoRAParam, ...)
    graphdef, lora, rest = parts
    tx = optax.adamw(1e-4)
    box = {"lora": lora, "opt": tx.init(lora)}

    @jax.jit
    def step(lora, opt_state, rest, ids):
        def loss_fn(lora):
            return lm_loss(nnx.merge(graphdef, lora, rest)(ids), ids)

        loss, grads = jax.value_and_grad(loss_fn)(lora)
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    def run() -> None:
        box["lora"], box["opt"], loss = step(box["lora"], box["opt"], rest, ids)
        loss.block_until_ready()

    n = sum(x.size for x in jax.tree.leaves(lora))
    return Runner(name, run, n, _bytes(lora), _bytes(box["opt"]))


SERVING_ADAPTERS = 4
SERVING_TARGET = 1.2


def serving_runners(model: GPT, variables: dict, ids: jax.Array) -> list[Runner]:
    """Forward passes: the base, one adapter swapped at every call, a mixed batch of 4."""
    config = lj.LoraConfig(rank=RANK, alpha=16.0, targets=ALL_LINEAR)
    loras = [
        jax.tree.map(lambda x: x + 0.01, lj.split(variables, config, key=jax.random.key(i))[1])
        for i in range(SERVING_ADAPTERS)
    ]  # B != 0, so no adapter is trivially the base
    stacked = lj.stack_adapters(loras)
    apply, mixed = lj.lora_apply(model.apply, config), lj.lora_apply_mixed(model.apply, config)

    def runner(name: str, fn: Callable[..., Any], args: Callable[[int], tuple]) -> Runner:
        box = Runner(name, lambda: None, 0, 0, 0)

        def traced(*a: Any) -> Any:
            box.traces += 1  # runs once per trace, not per call
            return fn(*a)

        jitted = jax.jit(traced)

        def run() -> None:
            jitted(*args(box.calls)).block_until_ready()
            box.calls += 1

        box.run = run
        return box

    rotations = [(jnp.arange(ids.shape[0]) + i) % SERVING_ADAPTERS for i in range(4)]
    return [
        runner("forward, base (no adapter)", model.apply, lambda i: (variables, ids)),
        runner(
            "forward, one adapter (swapped every call)",
            apply,
            lambda i: (variables, loras[i % SERVING_ADAPTERS], ids),
        ),
        runner(
            f"forward, mixed batch of {SERVING_ADAPTERS} adapters",
            mixed,
            lambda i: (variables, stacked, rotations[i % 4], ids),
        ),
    ]


def serving_table(runners: list[Runner], cfg: GPTConfig) -> str:
    """Markdown table of forward times; ratios paired per round against one adapter."""
    one = runners[1].times
    lines = [
        f"Serving: {cfg.layers} layers, d_model {cfg.d_model}, batch {cfg.batch}, seq "
        f"{cfg.seq}, all-linear rank {RANK}, {SERVING_ADAPTERS} adapters; {len(one)} rounds.",
        "",
        "| serving variant | median forward (ms) | ratio to one adapter | ratio range | target "
        "| traces / calls |",
        "|---|---|---|---|---|---|",
    ]
    for r in runners:
        ratios = [t / o for t, o in zip(r.times, one, strict=True)]
        ratio = statistics.median(ratios)
        mixed = r is runners[-1]
        met = "met" if ratio <= SERVING_TARGET else "MISSED"
        verdict = f"<= {SERVING_TARGET} {met}" if mixed else ""
        lines.append(
            f"| {r.name} | {1e3 * statistics.median(r.times):.1f} | {ratio:.2f} "
            f"| {min(ratios):.2f}-{max(ratios):.2f} | {verdict} "
            f"| {r.traces} / {r.calls} |"
        )
    return "\n".join(lines)


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


def table(runners: list[Runner], cfg: GPTConfig) -> str:
    """Markdown table. Ratios are paired: each round's step over the same round's full
    fine-tuning step (the variants alternate, so drift on a shared machine cancels), and the
    median of those is reported with its range."""
    full = runners[0].times
    lines = [
        f"Model: {cfg.layers} layers, d_model {cfg.d_model}, {cfg.heads} heads, vocab {cfg.vocab}, "
        f"seq {cfg.seq}, batch {cfg.batch}, float32, adamw, rank {RANK}; {len(full)} rounds. "
        f"Machine: {platform.machine()} {jax.devices()[0].platform.upper()}, "
        f"{jax.device_count()} device(s), jax {jax.__version__}.",
        "",
        "| variant | median step (s) | ratio to full | ratio range | target | compile (s) "
        "| trainable params | trainable bytes | optimizer state |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runners:
        med = statistics.median(r.times)
        ratios = [t / f for t, f in zip(r.times, full, strict=True)]
        ratio = statistics.median(ratios)
        target = TARGETS.get(r.name)
        verdict = f"<= {target} {'met' if ratio <= target else 'MISSED'}" if target else ""
        lines.append(
            f"| {r.name} | {med:.3f} | {ratio:.2f} | {min(ratios):.2f}-{max(ratios):.2f} "
            f"| {verdict} | {max(r.compile_s - med, 0):.1f} | {r.trainable:,} "
            f"| {r.trainable_bytes / 2**20:.2f} MiB | {r.opt_bytes / 2**20:.2f} MiB |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="medium")
    parser.add_argument("--rounds", type=int, default=7, help="timed steps per variant")
    parser.add_argument(
        "--part",
        choices=("all", "train", "serving"),
        default="all",
        help="the training-step table, the serving table, or both",
    )
    args = parser.parse_args(argv)
    cfg = PRESETS[args.preset]
    model = GPT(cfg)
    ids = jax.random.randint(jax.random.key(0), (cfg.batch, cfg.seq), 0, cfg.vocab)
    variables = jax.jit(model.init)(jax.random.key(0), ids)
    print(f"benchmark: preset {args.preset}, {args.rounds} rounds", flush=True)
    tables = []
    if args.part in ("all", "train"):
        runners = [
            full_runner(model, variables, ids),
            lora_runner("lora q/v", model, variables, ids, QV),
            lora_runner("lora all-linear", model, variables, ids, ALL_LINEAR),
            lora_runner(
                "lora all-linear, merged path", model, variables, ids, ALL_LINEAR, merged=True
            ),
            nnx_runner("nnx.LoRALinear q/v (peer)", cfg, ids, {"query", "value"}),
            nnx_runner("nnx.LoRALinear all-linear (peer)", cfg, ids, set(NNX_ALL_LINEAR)),
            floor_runner(model, variables, ids),
        ]
        measure(runners, args.rounds)
        tables.append(table(runners, cfg))
    if args.part in ("all", "serving"):
        serving = serving_runners(model, variables, ids)
        measure(serving, args.rounds)
        tables.append(serving_table(serving, cfg))
    result = "\n\n".join(tables)
    print("\n" + result)
    return result


if __name__ == "__main__":
    main()
