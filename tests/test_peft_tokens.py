"""Token rows (PEFT's ``trainable_token_indices``) against real PEFT on PyTorch-CPU, both
ways, on the app's Llama with a tied and an untied head: our trained rows load in
``peft.PeftModel`` with the same logits, PEFT's rows import here with the same logits, and
what one side cannot express is an error."""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import test_peft as tp
from hf_models import random_model

import lora_jax as lj
from train.models import Llama, from_pretrained
from train.models.peft_map import module_map

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
st = pytest.importorskip("safetensors.numpy")

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

SIZES = tp.SIZES
RNG = np.random.default_rng(0)
IDX, HEAD_IDX = [5, 77, 3, 120], [9, 77]
INPUTS = [RNG.integers(0, 128, (2, 9)) for _ in range(2)]
for ids in INPUTS:
    ids[:, :4] = IDX  # every replaced row is looked up
TOL = 1e-4
EMBED, HEAD = "params/embed_tokens/embedding", "params/lm_head/kernel"
DELTA = "token_adapter.trainable_tokens_delta"
KEY = jax.random.key(0)


@pytest.fixture(scope="module", params=["untied", "tied"])
def base(request, tmp_path_factory):
    """The HF folder of a tiny Llama (every weight drawn) and its Flax load."""
    tied = request.param == "tied"
    config = transformers.LlamaConfig(
        **SIZES, tie_word_embeddings=tied, attn_implementation="eager"
    )
    model = random_model(config)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    config, variables = from_pretrained(folder)
    assert config.tie_embeddings == tied and ("lm_head" in variables["params"]) != tied
    layouts = lj.infer_layouts(Llama(config).apply, variables, jnp.asarray(INPUTS[0]))
    return folder, config, variables, layouts


def _peft_logits(folder: pathlib.Path, adapter: pathlib.Path) -> list[np.ndarray]:
    model = peft.PeftModel.from_pretrained(tp._torch(folder), adapter).eval()
    with torch.no_grad():
        return [model(torch.from_numpy(ids)).logits.numpy() for ids in INPUTS]


@functools.cache
def _forward(config):
    """One compiled forward per config: the base with the rows, and the adapters."""
    apply = lj.lora_apply(Llama(config).apply)
    return jax.jit(lambda frozen, lora, rows, ids: apply(lj.tokens.apply(frozen, rows), lora, ids))


def _our_logits(config, frozen, lora, rows) -> list[np.ndarray]:
    return [np.asarray(_forward(config)(frozen, lora, rows, jnp.asarray(ids))) for ids in INPUTS]


def _max_diff(xs, ys) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(xs, ys, strict=True))


def _assert_same(name, ours, theirs, without_rows) -> None:
    """Within TOL of PEFT; and visibly far from the same adapter without the rows."""
    diff, moved = _max_diff(ours, theirs), _max_diff(ours, without_rows)
    print(f"\n{name}: max |logit diff| = {diff:.2e} (the rows move them by {moved:.2f})")
    assert diff <= TOL, f"{name}: max abs logit difference {diff} > {TOL}"
    assert moved > 1e-2, f"{name}: the rows change nothing"


def _flat(rows) -> dict[str, lj.tokens.TokenRows]:
    is_rows = lambda x: isinstance(x, lj.tokens.TokenRows)
    flat = jax.tree_util.tree_flatten_with_path(rows, is_leaf=is_rows)[0]
    return {"/".join(k.key for k in kp): r for kp, r in flat}


def _original(frozen, rows):
    """The same rows at the base's values: the adapter without what the rows changed."""
    return lj.tokens.select(frozen, {p: list(r.indices) for p, r in _flat(rows).items()})


def _paths(config) -> dict[str, list[int]]:
    return {EMBED: IDX} if config.tie_embeddings else {EMBED: IDX, HEAD: HEAD_IDX}


def _train(config, frozen, lora, rows, steps: int = 3):
    """A few real Adam steps of next-token loss over the adapters and the rows together."""
    apply = lj.lora_apply(Llama(config).apply)
    ids = jnp.asarray(np.concatenate(INPUTS))

    def loss_fn(trainable):
        logits = apply(lj.tokens.apply(frozen, trainable["rows"]), trainable["lora"], ids[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    tx = optax.adam(5e-2)
    trainable = {"lora": lora, "rows": rows}
    opt_state = tx.init(trainable)

    @jax.jit
    def step(trainable, opt_state):
        grads = jax.grad(loss_fn)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state

    for _ in range(steps):
        trainable, opt_state = step(trainable, opt_state)
    return trainable["lora"], trainable["rows"]


def test_trained_rows_export_and_load_in_peft_with_same_logits(base, tmp_path):
    folder, config, variables, layouts = base
    lora_config = lj.LoraConfig(rank=4, alpha=8, targets=r".*/(q_proj|v_proj)/kernel")
    frozen, lora = lj.split(variables, lora_config, key=jax.random.key(0), layouts=layouts)
    rows0 = lj.tokens.select(frozen, _paths(config))
    lora, rows = _train(config, frozen, lora, rows0)
    for r0, r in zip(_flat(rows0).values(), _flat(rows).values(), strict=True):
        assert np.abs(np.asarray(r.values - r0.values)).min(axis=1).max() > 0  # trained
    lj.peft.export_adapter(tmp_path, lora, module_map=module_map(config), tokens=rows)
    record = json.loads((tmp_path / "adapter_config.json").read_text())
    want = {"model.embed_tokens": IDX} | ({} if config.tie_embeddings else {"lm_head": HEAD_IDX})
    assert record["trainable_token_indices"] == want
    tensors = st.load_file(str(tmp_path / "adapter_model.safetensors"))
    keys = sorted(k for k in tensors if DELTA in k)
    assert keys == sorted(f"base_model.model.{m}.{DELTA}" for m in want)
    assert tensors[f"base_model.model.model.embed_tokens.{DELTA}"].shape == (len(IDX), 64)
    ours = _our_logits(config, frozen, lora, rows)
    _assert_same(
        f"export rows ({'tied' if config.tie_embeddings else 'untied'})",
        ours,
        _peft_logits(folder, tmp_path),
        _our_logits(config, frozen, lora, rows0),
    )
    _, rows2 = lj.peft.import_adapter(
        tmp_path, frozen, module_map=module_map(config), layouts=layouts, tokens=True
    )
    for a, b in zip(jax.tree.leaves(rows2), jax.tree.leaves(rows), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # exact round trip
    assert jax.tree.structure(rows2) == jax.tree.structure(rows)


def _peft_saved(folder, tmp_path, tokens) -> pathlib.Path:
    """A PEFT LoRA with trainable token rows, the rows moved off the base (random)."""
    hf = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["k_proj"],
        trainable_token_indices=tokens,
        init_lora_weights=False,
    )
    model = peft.get_peft_model(tp._torch(folder), hf)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(0.5 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "theirs")
    return tmp_path / "theirs"


# PEFT's two forms: a list (the input embedding), a dict by module name (a name matches
# every module ending with it). With a tied head PEFT ties its rows to the embedding's and
# saves nothing for it.
FORMS = {
    "list": IDX,
    "dict": {"embed_tokens": IDX, "lm_head": HEAD_IDX},
    "tied-dict": {"embed_tokens": IDX, "lm_head": IDX},
}


@pytest.mark.parametrize("form", list(FORMS))
def test_peft_rows_import_with_same_logits(base, tmp_path, form):
    folder, config, variables, layouts = base
    if (form == "dict") == config.tie_embeddings and form != "list":
        pytest.skip("dict with a head of its own: untied; same indices for the head: tied")
    adapter = _peft_saved(folder, tmp_path, FORMS[form])
    saved = st.load_file(str(adapter / "adapter_model.safetensors"))
    assert (f"base_model.model.lm_head.{DELTA}" in saved) == (form == "dict")
    mm = module_map(config)
    with pytest.raises(ValueError, match="pass tokens=True to import_adapter"):
        lj.peft.import_adapter(adapter, variables, module_map=mm, layouts=layouts)
    lora, rows = lj.peft.import_adapter(
        adapter, variables, module_map=mm, layouts=layouts, tokens=True
    )
    emb = rows["params"]["embed_tokens"]["embedding"]
    assert emb.indices == tuple(IDX) and emb.axis == 0
    if form == "dict":
        assert rows["params"]["lm_head"]["kernel"].indices == tuple(HEAD_IDX)
        assert rows["params"]["lm_head"]["kernel"].axis == 1
    ours = _our_logits(config, variables, lora, rows)
    kind = "tied" if config.tie_embeddings else "untied"
    _assert_same(
        f"import rows {form} ({kind})",
        ours,
        _peft_logits(folder, adapter),
        _our_logits(config, variables, lora, _original(variables, rows)),
    )


def test_what_the_other_side_cannot_express_is_an_error(base, tmp_path):
    folder, config, variables, layouts = base
    mm = module_map(config)
    if config.tie_embeddings:
        # PEFT on a tied model given other indices for the head saves rows of its own for
        # it; here the tied head reads the embedding's table, so it cannot have them
        adapter = _peft_saved(folder, tmp_path, {"embed_tokens": IDX, "lm_head": HEAD_IDX})
        with pytest.raises(ValueError, match="names 'lm_head', which matches no module"):
            lj.peft.import_adapter(adapter, variables, module_map=mm, layouts=layouts, tokens=True)
        return
    split = lambda targets: lj.split(variables, lj.LoraConfig(rank=2, targets=targets), key=KEY)
    _, lora = split(".*/q_proj/kernel")
    rows = lj.tokens.select(variables, _paths(config))
    _, on_head = split(".*/lm_head/kernel")
    with pytest.raises(ValueError, match="lm_head/kernel has both a LoRA adapter and token rows"):
        lj.peft.export_adapter(tmp_path, on_head, module_map=mm, tokens=rows)
    head = dataclasses.replace(rows["params"]["lm_head"]["kernel"], axis=0)
    with pytest.raises(ValueError, match="rows along axis 0, but `module_map` makes it the linear"):
        lj.peft.export_adapter(
            tmp_path, lora, module_map=mm, tokens={"params": {"lm_head": {"kernel": head}}}
        )
    no_rule = lj.peft.ModuleMap(mm.rules[:2])
    with pytest.raises(ValueError, match="no rule making one Embedding or Linear of params/embed"):
        lj.peft.export_adapter(tmp_path, lora, module_map=no_rule, tokens=rows)
    with pytest.raises(TypeError, match="`tokens` must hold only TokenRows"):
        lj.peft.export_adapter(tmp_path, lora, module_map=mm, tokens={"a": jnp.zeros(2)})
    with pytest.raises(ValueError, match="`tokens` holds no TokenRows; pass None"):
        lj.peft.export_adapter(tmp_path, lora, module_map=mm, tokens={})
    assert not (tmp_path / "adapter_config.json").exists()
    # a tied model's file (PEFT saves no rows for a tied head) onto this untied base
    tied_like = _peft_saved(folder, tmp_path, {"embed_tokens": IDX})
    record = json.loads((tied_like / "adapter_config.json").read_text())
    record["trainable_token_indices"]["lm_head"] = IDX
    (tied_like / "adapter_config.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="the file has no rows for it"):
        lj.peft.import_adapter(tied_like, variables, module_map=mm, layouts=layouts, tokens=True)
