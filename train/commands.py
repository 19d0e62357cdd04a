"""The five subcommands of ``python -m train``: pretrain, finetune, eval, sample, export.

Each takes the resolved `Settings` and an output stream, prints what a person wants to
read, and leaves files a person can plot or load (``metrics.jsonl``, ``loss.png``,
``summary.json``, the adapter). User mistakes raise `UserError` (one line, no traceback).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import resource
import shutil
import sys
import time
from typing import Any, TextIO

import jax
import jax.numpy as jnp

import lora_jax as lj
from train import corpora, mixed_sampling, multitask
from train.base import Base, builtin_folder, cast, load_base, save_base
from train.evaluation import eval_loss, make_eval_fn
from train.finetune import (
    ADAPTER,
    CHECKPOINTS,
    LoraResult,
    lora_logits_fn,
    new_state,
    run_lora,
)
from train.full import train_full
from train.gguf_tokenizer import gguf_vocab_fields
from train.models import PRESETS, Llama, LlamaConfig, init_cache
from train.models.export import export_merged
from train.models.gguf_out import export_gguf
from train.models.peft_map import module_map
from train.placement import make_strategy
from train.quantized import quantize_base
from train.report import PLOT_FILE, Reporter, plot_losses, read_metrics
from train.sampling import generate
from train.settings import COMMAND_DEFAULTS, Settings, UserError

__all__ = ["RUNNERS", "builtin_recipe", "ensure_base"]

SUMMARY_FILE = "summary.json"


def builtin_recipe() -> dict[str, Any]:
    """How the built-in base is pretrained (its cache folder is a hash of this).

    Example:
        >>> builtin_recipe()["model"]["vocab_size"]
        258
    """
    recipe = {k: v for k, v in COMMAND_DEFAULTS["pretrain"].items() if k != "run_dir"}
    recipe["data"] = list(recipe["data"])
    # Kernel choices change speed and memory, not the weights: not part of the recipe's hash.
    model = {k: v for k, v in PRESETS["tiny"].to_dict().items() if k not in _KERNEL_FIELDS}
    return {"model": model, "seed": 0, **recipe}


_KERNEL_FIELDS = ("remat", "attention")


def _with_kernels(
    config: LlamaConfig, s: Settings, fields: tuple[str, ...] = _KERNEL_FIELDS
) -> LlamaConfig:
    """`config` with the run's `fields` of ``--remat`` / ``--attention`` (same math, other
    kernels); a command passes those it offers (`train.cli.FLAGS`)."""
    return dataclasses.replace(config, **{k: getattr(s, k) for k in fields})


def ensure_base(
    s: Settings, out: TextIO, *, quantize: bool = True, kernels: tuple[str, ...] = ()
) -> Base:
    """Loads the run's base, pretraining and caching the built-in one the first time, and
    quantizes it as ``--quantize`` asks (cached too), unless `quantize` is False. `kernels`:
    the settings of ``--remat`` / ``--attention`` the command reads, set on its config."""
    base = _float_base(s, out)
    base = dataclasses.replace(base, config=_with_kernels(base.config, s, kernels))
    return quantize_base(s, base, out) if quantize else base


def _float_base(s: Settings, out: TextIO) -> Base:
    if s.base != "tiny":
        return load_base(s.base, dtype=s.dtype, tokenizer=s.tokenizer, scan_layers=s.scan_layers)
    recipe = builtin_recipe()
    folder = builtin_folder(s.cache_dir, recipe)
    if not folder.exists():
        print(
            f"No cached base model in {folder}: pretraining the built-in tiny model on "
            "English prose (pydoc topics), once.",
            file=out,
        )
        pre = Settings(
            command="pretrain",
            run_dir=str(folder),
            **{k: v for k, v in COMMAND_DEFAULTS["pretrain"].items() if k != "run_dir"},
            progress=s.progress,
            cache_dir=s.cache_dir,
        )
        pretrain(pre, out)
    return load_base(folder, dtype=s.dtype, tokenizer=s.tokenizer, scan_layers=s.scan_layers)


def pretrain(s: Settings, out: TextIO) -> dict[str, Any]:
    """``python -m train pretrain``: trains a preset model (``--base tiny`` or ``micro``) from
    scratch and writes a base folder."""
    config = PRESETS.get(s.base)
    if config is None:
        raise UserError(
            f"pretrain builds a preset model ({', '.join(PRESETS)}); --base {s.base!r} is not one."
        )
    if s.seq_len > config.max_seq_len:
        raise UserError(f"--seq-len {s.seq_len} exceeds the model's {config.max_seq_len}.")
    tok = corpora.tokenizer_for(s, default="byte")
    train_set, eval_set = corpora.load_splits(s, tok)
    model = Llama(_with_kernels(config, s))
    ids = jnp.zeros((1, s.seq_len), jnp.int32)
    variables = cast(model.init(jax.random.key(s.seed), ids), s.dtype)
    run_dir = pathlib.Path(s.run_dir).absolute()
    staging = run_dir.with_name(run_dir.name + ".log")
    with Reporter(
        staging, total=s.steps, start=0, progress=s.progress, desc="pretrain", stream=out
    ) as rep:
        result = train_full(
            _with_kernels(config, s),
            variables,
            corpora.batches(s, train_set),
            corpora.eval_sets(s, eval_set),
            steps=s.steps,
            lr=s.lr,
            warmup_steps=s.warmup_steps,
            min_lr_ratio=s.min_lr_ratio,
            weight_decay=s.weight_decay,
            clip_norm=s.clip_norm,
            log_every=s.log_every,
            eval_every=s.eval_every,
            tokens_per_step=s.batch_size * s.seq_len,
            reporter=rep,
        )
    info = {
        "data": list(s.data),
        "steps": s.steps,
        "eval_loss": result.eval_loss,
        "train_loss": result.train_loss,
        "tokens_per_s": result.tokens_per_s,
    }
    save_base(run_dir, config, result.variables, tokenizer=tok.name, info=info)
    for name in ("metrics.jsonl",):
        shutil.move(staging / name, run_dir / name)
    shutil.rmtree(staging, ignore_errors=True)
    plot_losses(read_metrics(run_dir), run_dir / PLOT_FILE, title="pretraining")
    print(
        f"Pretrained base saved in {run_dir}: eval loss {result.eval_loss:.3f}, "
        f"{result.seconds:.0f} s.",
        file=out,
    )
    return info


def _sample_shape(s: Settings, base: Base) -> tuple[jax.Array, int]:
    """The prompt's ids and the cache length; checked before any training starts."""
    if len(s.prompt) > 1:
        raise UserError(
            f"{len(s.prompt)} --prompt texts: a run with one adapter samples one; several "
            "go with a multi-task run (--task) or `sample --adapter NAME=DIR ...`."
        )
    prompt = corpora.encode_prompt(base.tokenizer, s.prompt[0])
    length = prompt.shape[1] + s.max_new_tokens
    if length > base.config.max_seq_len:
        raise UserError(
            f"--prompt ({prompt.shape[1]} tokens) + --max-new-tokens {s.max_new_tokens} exceed "
            f"the model's {base.config.max_seq_len} positions; lower --max-new-tokens."
        )
    return prompt, length


def _sample_pair(s: Settings, base: Base, frozen: Any, lora: Any) -> dict[str, str]:
    """A sample for the same prompt from the base and (if given) the adapted model."""
    model = Llama(base.config)
    prompt, length = _sample_shape(s, base)
    kwargs: dict[str, Any] = dict(
        max_new_tokens=s.max_new_tokens,
        key=jax.random.key(s.seed),
        temperature=s.temperature,
        top_k=s.top_k,
        eos_id=base.tokenizer.eos_id,
    )

    def cache() -> Any:
        return init_cache(base.config, 1, length, dtype=jnp.dtype(s.dtype))

    def apply(params: Any, ids: jax.Array, c: Any) -> Any:
        return model.apply(params, ids, cache=c)

    # A model with more embeddings than its tokenizer has ids samples only ids it can decode.
    plain = _TokenizerIds(apply, base.tokenizer.vocab_size)
    fwd = _TokenizerIds(
        _LoraForward(lj.lora_apply(model.apply, deterministic=True)), base.tokenizer.vocab_size
    )
    if base.quant is None:
        base_ids = generate(plain, base.variables, prompt, cache(), **kwargs)[0]
    else:  # a quantized base runs through the library (no adapters): unpacked where used
        base_ids = generate(fwd, (base.variables, None), prompt, cache(), **kwargs)[0]
    out = {"base": base.tokenizer.decode(base_ids)}
    if lora is not None:
        if s.merged:  # a quantized kernel merges as its float value; unadapted ones unpack
            merged = lj.quant.dequantize_tree(lj.merge(frozen, lora))
            ids = generate(plain, merged, prompt, cache(), **kwargs)[0]
        else:
            ids = generate(fwd, (frozen, lora), prompt, cache(), **kwargs)[0]
        out["adapted"] = base.tokenizer.decode(ids)
    return out


@dataclasses.dataclass(frozen=True)
class _TokenizerIds:
    """A sampling forward whose logits keep only the first `vocab` ids (the tokenizer's)."""

    forward: Any
    vocab: int

    def __call__(self, params: Any, ids: jax.Array, c: Any) -> Any:
        logits, c = self.forward(params, ids, c)
        return logits[..., : self.vocab], c


@dataclasses.dataclass(frozen=True)
class _LoraForward:
    apply: Any

    def __call__(self, params: Any, ids: jax.Array, c: Any) -> Any:
        return self.apply(params[0], params[1], ids, cache=c)


def _adapter_dir(s: Settings) -> pathlib.Path:
    if len(s.adapter) > 1:
        raise UserError(
            f"`{s.command}` reads one --adapter; found {len(s.adapter)}: "
            f"{' '.join(s.adapter)} (`sample` takes several)."
        )
    if s.adapter:
        return pathlib.Path(mixed_sampling.adapter_entry(s.adapter[0])[1] or s.adapter[0])
    return pathlib.Path(s.run_dir) / ADAPTER


def _load_adapter(s: Settings, base: Base) -> tuple[Any, Any]:
    """``(frozen, lora)`` of the run: ``adapter/`` (or ``--adapter``), else its latest
    checkpoint (restored into the adapters that the run's settings create)."""
    folder = _adapter_dir(s)
    checkpoints = pathlib.Path(s.run_dir) / CHECKPOINTS
    try:
        if (folder / lj.io.METADATA_FILE).exists():
            lora = lj.load_adapter(folder, frozen=base.variables, strict=True)
        elif not s.adapter and (pathlib.Path(s.run_dir) / multitask.ADAPTERS).is_dir():
            tasks = sorted(p.name for p in (pathlib.Path(s.run_dir) / multitask.ADAPTERS).iterdir())
            raise UserError(
                f"{s.run_dir} is a multi-task run (one adapter per task: {', '.join(tasks)}); "
                f"pass --adapter {pathlib.Path(s.run_dir) / multitask.ADAPTERS}/NAME."
            )
        elif not s.adapter and checkpoints.is_dir() and any(checkpoints.iterdir()):
            with lj.CheckpointManager(checkpoints, read_only=True) as mgr:
                target = new_state(s, base)[1]
                frozen = base.variables
                state, _ = mgr.restore(target, frozen=frozen, strict=True)
            lora = state.lora
        else:
            raise UserError(
                f"no adapter in {folder} (missing {lj.io.METADATA_FILE}) and no checkpoints in "
                f"{checkpoints}; finish a `finetune` run there, or pass --adapter DIR."
            )
    except UserError:
        raise
    except ValueError as err:
        raise UserError(str(err)) from None
    return base.variables, lora  # the app trains with the default init: base as is


def _has_adapter(s: Settings) -> bool:
    checkpoints = pathlib.Path(s.run_dir) / CHECKPOINTS
    return (
        bool(s.adapter)
        or (_adapter_dir(s) / lj.io.METADATA_FILE).exists()
        or (checkpoints.is_dir() and any(checkpoints.iterdir()))
    )


def finetune(s: Settings, out: TextIO) -> dict[str, Any]:
    """``python -m train finetune`` (the default): LoRA on the base, then a report."""
    if s.task:  # one adapter per task, trained together (train.multitask)
        return multitask.finetune_tasks(s, out, ensure_base)
    t_start = time.perf_counter()
    strategy = make_strategy(s)
    float_base = ensure_base(s, out, quantize=False, kernels=_KERNEL_FIELDS)
    base = quantize_base(s, float_base, out)  # a bad --quantize-group fails now
    corpora.check_seq_len(s, base)
    _sample_shape(s, base)  # a bad sampling setting fails now, not after training
    train_set, eval_set = corpora.load_splits(s, base.tokenizer)
    evals = corpora.eval_sets(s, eval_set)
    report: dict[str, Any] = {
        "base_eval_loss": eval_loss(base_eval_fn(base), base.variables, evals)
    }
    report.update(_bytes_report(base, float_base))
    if base.quant is not None:
        fn = base_eval_fn(float_base)
        report["float_base_eval_loss"] = eval_loss(fn, float_base.variables, evals)
    del float_base  # a quantized run keeps only the quantized base
    main = jax.process_index() == 0
    result = run_lora(s, base, train_set, evals, strategy, out if main else None)
    report.update(_lora_report(result))
    base_loss = report["base_eval_loss"]
    run_dir = pathlib.Path(s.run_dir).absolute()
    # Every process calls it (a collective under jax.distributed); process 0 writes.
    frozen = base.variables
    lj.save_adapter(run_dir / ADAPTER, result.lora, overwrite=True, frozen=frozen)
    del frozen
    report["adapter_bytes_on_disk"] = _folder_bytes(run_dir / ADAPTER)
    if s.compare_full:
        with Reporter(
            None, total=s.steps, start=0, progress=s.progress, desc="full", stream=out, enabled=main
        ) as rep:
            full = train_full(
                base.config,
                lj.quant.dequantize_tree(base.variables),  # a quantized base: its float twin
                corpora.batches(s, train_set),
                evals,
                steps=s.steps,
                lr=s.full_lr,
                warmup_steps=s.warmup_steps,
                min_lr_ratio=s.min_lr_ratio,
                weight_decay=s.weight_decay,
                clip_norm=s.clip_norm,
                log_every=s.log_every,
                eval_every=s.steps,
                tokens_per_step=s.batch_size * s.seq_len,
                reporter=rep,
            )
        report.update(
            full_eval_loss=full.eval_loss,
            full_tokens_per_s=full.tokens_per_s,
            full_opt_state_bytes=full.opt_state_bytes,
        )
    if main:
        report["samples"] = _sample_pair(s, base, result.frozen, result.lora)
        report["seconds"] = time.perf_counter() - t_start
        report["peak_rss_bytes"] = peak_rss_bytes()
        references = {"base": base_loss}
        if report.get("full_eval_loss") is not None:
            references["full fine-tune"] = report["full_eval_loss"]
        plot_losses(
            read_metrics(run_dir),
            run_dir / PLOT_FILE,
            title="LoRA fine-tuning",
            references=references,
        )
        (run_dir / SUMMARY_FILE).write_text(json.dumps(report, indent=2) + "\n")
        print(_format_report(s, base, report, run_dir), file=out)
    return report


def base_eval_fn(base: Base) -> Any:
    """``fn(variables, ids) -> logits`` of the base alone (eval): a quantized base runs
    through `lj.lora_apply` with no adapters, which unpacks each kernel where it is used."""
    model = Llama(base.config)
    if base.quant is None:
        return make_eval_fn(model.apply)
    apply = lj.lora_apply(model.apply, deterministic=True)
    return make_eval_fn(_NoAdapter(apply))


@dataclasses.dataclass(frozen=True)
class _NoAdapter:
    apply: Any

    def __call__(self, variables: Any, ids: jax.Array) -> Any:
        return self.apply(variables, None, ids)


def _bytes_report(base: Base, float_base: Base) -> dict[str, Any]:
    """The base's bytes, float and (with ``--quantize``) quantized."""
    if base.quant is None:
        return {"base_bytes": lj.quant.nbytes(float_base.variables)}
    q = base.quant
    return {
        "base_bytes": q.float_bytes,
        "base_bytes_quantized": q.quantized_bytes,
        "base_quantized": q.format,
        "base_quantize_group": q.group_size,
        "base_quantized_cached": q.cached,
        "base_quantized_folder": q.folder,
    }


def _bytes_line(s: Settings, r: dict[str, Any]) -> str:
    """``base: 1.23 MiB float32 -> 0.21 MiB nf4 (0.17), ...``"""
    mib = lambda n: f"{n / 2**20:,.2f} MiB"
    line = f"base: {mib(r['base_bytes'])} {s.dtype}"
    if "base_bytes_quantized" in r:
        fmt = r["base_quantized"] + (
            f" g{r['base_quantize_group']}" if r["base_quantized"] != "int8" else ""
        )
        line += (
            f" -> {mib(r['base_bytes_quantized'])} {fmt} "
            f"({r['base_bytes_quantized'] / r['base_bytes']:.2f}), "
            + ("read from the cache" if r["base_quantized_cached"] else "quantized and cached")
        )
    return line


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (the OS's high-water mark), in bytes.

    Example:
        >>> peak_rss_bytes() > 0
        True
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux: KiB


def _lora_report(r: LoraResult) -> dict[str, Any]:
    return {
        "lora_eval_loss": r.eval_loss,
        "lora_train_loss": r.train_loss,
        "trainable_params": r.summary.trainable,
        "base_params": r.summary.total,
        "trainable_share": r.summary.fraction,
        "adapter_bytes": r.summary.adapter_bytes,
        "tokens_per_s": r.tokens_per_s,
        "train_seconds": r.seconds,
    }


def _folder_bytes(folder: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _adapter_line(r: dict[str, Any]) -> str:
    arrays = f"{r['adapter_bytes'] / 1024:,.0f} KiB of A/B"
    if "adapter_bytes_on_disk" not in r:
        return f"{arrays}, in the last checkpoint"
    return f"{r['adapter_bytes_on_disk'] / 1024:,.0f} KiB on disk ({arrays})"


def _format_report(s: Settings, base: Base, r: dict[str, Any], run_dir: pathlib.Path) -> str:
    loss = f"base {r['base_eval_loss']:.3f} -> LoRA {r['lora_eval_loss']:.3f}"
    if r.get("float_base_eval_loss") is not None:
        loss = (
            f"base {r['float_base_eval_loss']:.3f}, {r['base_quantized']} base "
            f"{r['base_eval_loss']:.3f} -> QLoRA {r['lora_eval_loss']:.3f}"
        )
    if r.get("full_eval_loss") is not None:
        loss += f" (full fine-tune {r['full_eval_loss']:.3f})"
    speed = f"LoRA {r['tokens_per_s'] or 0:,.0f}"
    if r.get("full_tokens_per_s"):
        speed += f", full fine-tune {r['full_tokens_per_s']:,.0f}"
    lines = [
        "",
        f"Run folder        {run_dir}  (metrics.jsonl, loss.png, {ADAPTER}/, summary.json)",
        f"Base              {base.source}",
        f"Size              {_bytes_line(s, r)}",
        f"Eval loss         {loss}  (nats/token on held-out {', '.join(s.eval_data or s.data)})",
        f"Trainable         {r['trainable_params']:,} of {r['base_params']:,} parameters "
        f"({100 * r['trainable_share']:.2f}%), rank {s.rank} on {s.targets}",
        f"Adapter           {_adapter_line(r)}",
        f"Tokens/s          {speed}",
        f"Peak memory       {r['peak_rss_bytes'] / 2**20:,.0f} MiB (process RSS high-water mark)",
        f"Time              {r['seconds']:.0f} s in all, LoRA training {r['train_seconds']:.0f} s",
        f"Sample            prompt {s.prompt[0]!r}",
        f"  base:    {r['samples']['base']!r}",
        f"  adapted: {r['samples'].get('adapted', '')!r}",
    ]
    return "\n".join(lines)


def evaluate(s: Settings, out: TextIO) -> dict[str, Any]:
    """``python -m train eval``: eval loss of the base and, if there is one, the adapter."""
    base = ensure_base(s, out, kernels=("attention",))
    corpora.check_seq_len(s, base)
    _, eval_set = corpora.load_splits(s, base.tokenizer)
    evals = corpora.eval_sets(s, eval_set)
    model = Llama(base.config)
    result = {"base_eval_loss": eval_loss(base_eval_fn(base), base.variables, evals)}
    what = "" if base.quant is None else f" ({base.quant.format})"
    line = f"eval loss: base{what} {result['base_eval_loss']:.4f}"
    if _has_adapter(s):
        frozen, lora = _load_adapter(s, base)
        fn = make_eval_fn(lora_logits_fn(model))
        result["lora_eval_loss"] = eval_loss(fn, (frozen, lora), evals)
        line += f", with the adapter in {_adapter_dir(s)} {result['lora_eval_loss']:.4f}"
    print(line, file=out)
    return result


def sample(s: Settings, out: TextIO) -> dict[str, Any] | list[dict[str, str]]:
    """``python -m train sample``: continue ``--prompt`` with the base and the adapter, or
    (several ``--adapter NAME=DIR`` / ``--prompt``, or a multi-task run) a batch of prompts
    each with its own adapter, side by side."""
    if mixed_sampling.wants_mixed_sample(s):
        return mixed_sampling.sample_mixed(s, ensure_base(s, out, kernels=("attention",)), out)
    base = ensure_base(s, out, kernels=("attention",))
    frozen, lora = _load_adapter(s, base) if _has_adapter(s) else (None, None)
    samples = _sample_pair(s, base, frozen, lora)
    for name, text in samples.items():
        print(f"--- {name}{' (merged)' if name == 'adapted' and s.merged else ''}:", file=out)
        print(s.prompt[0] + text, file=out)
    return samples


def export(s: Settings, out: TextIO) -> dict[str, Any]:
    """``python -m train export``: the adapter in our format (``--lora-out``), as a
    HuggingFace PEFT adapter (``--peft-out``), or merged into a HuggingFace checkpoint
    folder (``--merged-out``) or a GGUF file (``--gguf-out``)."""
    if not (s.out_adapter or s.out_merged or s.out_peft or s.out_gguf):
        raise UserError(
            "export needs --lora-out DIR, --peft-out DIR, --merged-out DIR and/or --gguf-out FILE."
        )
    if s.gguf_type != "f16" and not s.out_gguf:
        raise UserError(f"--gguf-type {s.gguf_type} needs --gguf-out FILE.")
    base = ensure_base(s, out)
    frozen, lora = _load_adapter(s, base)
    written = {}
    if s.out_adapter:
        lj.save_adapter(s.out_adapter, lora, overwrite=True, frozen=frozen)
        written["adapter"] = s.out_adapter
    if s.out_peft:
        pathlib.Path(s.out_peft).mkdir(parents=True, exist_ok=True)
        lj.peft.export_adapter(
            s.out_peft,
            lora,
            module_map=module_map(base.config),
            base_model_name_or_path=base.source,
        )
        written["PEFT adapter"] = s.out_peft
    if s.out_merged:
        # A quantized base is merged as its float value (what the adapter was trained on).
        export_merged(s.out_merged, base.config, lj.quant.dequantize_tree(frozen), lora)
        corpora.copy_tokenizer_files(base, pathlib.Path(s.out_merged))
        written["merged weights"] = s.out_merged
    if s.out_gguf:
        vocab = gguf_vocab_fields(base.tokenizer, base.config.vocab_size)
        floats = lj.quant.dequantize_tree(frozen)
        export_gguf(s.out_gguf, base.config, floats, lora, vocab=vocab, gguf_type=s.gguf_type)
        written[f"GGUF ({s.gguf_type})"] = s.out_gguf
    for kind, path in written.items():
        print(f"wrote the {kind} to {path}", file=out)
    return written


RUNNERS = {
    "pretrain": pretrain,
    "finetune": finetune,
    "eval": evaluate,
    "sample": sample,
    "export": export,
}
