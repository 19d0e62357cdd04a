"""train.models: the Llama decoder (shapes, scan, KV cache, masks), its config, LoRA on it,
and local checkpoint I/O without torch (round trips and every error path)."""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import lora_jax as lj
from train.models import (
    PRESETS,
    Llama,
    LlamaConfig,
    config_from_hf,
    config_to_hf,
    from_hf_state,
    from_pretrained,
    init_cache,
    num_params,
    save_pretrained,
    to_hf_state,
)
from train.models.safetensors_io import read_safetensors, write_safetensors

SMALL = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    max_seq_len=32,
)
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8,
}
KERNELS = [f"self_attn/{p}_proj" for p in "qkvo"] + [
    f"mlp/{p}_proj" for p in ("gate", "up", "down")
]


def small(**kw) -> LlamaConfig:
    return LlamaConfig(**{**SMALL, **kw})


@functools.partial(jax.jit, static_argnums=0)
def forward(config: LlamaConfig, variables, ids, positions=None):
    """Jitted logits: one compile per config and shape (eager Flax runs op by op, far slower)."""
    return Llama(config).apply(variables, ids, positions=positions)


def noisy_init(config: LlamaConfig, seed: int = 0, scale: float = 0.2) -> dict:
    """Random values everywhere (norm scales near 1, biases non-zero) so every weight shows.

    Built in NumPy from the abstract init: no XLA compile."""
    shapes = jax.eval_shape(Llama(config).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        mean = 1.0 if path[-1].key == "scale" else 0.0
        return jnp.asarray(mean + scale * rng.standard_normal(leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def stack_layers(params: dict, n: int) -> dict:
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    out["layers"] = jax.tree.map(
        lambda *xs: jnp.stack(xs), *[params[f"layers_{i}"] for i in range(n)]
    )
    return out


def random_ids(shape, vocab=SMALL["vocab_size"], seed=1) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab, jnp.int32)


def paths(tree) -> set[str]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(k.key for k in path) for path, _ in flat}


# --- model -----------------------------------------------------------------------------


@pytest.mark.parametrize("tied, bias", [(False, False), (True, True)])
def test_param_names_and_shapes(tied, bias):
    c = small(tie_embeddings=tied, attention_bias=bias)
    variables = noisy_init(c)
    want = {"params/embed_tokens/embedding", "params/norm/scale"}
    want |= set() if tied else {"params/lm_head/kernel"}
    for i in range(c.num_layers):
        want |= {f"params/layers_{i}/{k}/kernel" for k in KERNELS}
        want |= {
            f"params/layers_{i}/{n}/scale" for n in ("input_layernorm", "post_attention_layernorm")
        }
        want |= {f"params/layers_{i}/self_attn/{p}_proj/bias" for p in "qkv"} if bias else set()
    assert paths(variables) == want
    attn = variables["params"]["layers_0"]["self_attn"]
    assert attn["q_proj"]["kernel"].shape == (32, 4 * 8)
    assert attn["k_proj"]["kernel"].shape == (32, 2 * 8)
    logits = forward(c, variables, random_ids((2, 5)))
    assert logits.shape == (2, 5, 64) and logits.dtype == jnp.float32


def test_bf16_compute_returns_f32_logits_and_num_params():
    c = small(dtype="bfloat16", param_dtype="bfloat16")
    shapes = jax.eval_shape(Llama(c).init, jax.random.key(0), random_ids((1, 3)))
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.bfloat16)}
    variables = noisy_init(c)
    assert forward(c, variables, random_ids((1, 3))).dtype == jnp.float32
    per_layer = 32 * 32 * 2 + 32 * 16 * 2 + 3 * 32 * 48 + 2 * 32
    assert num_params(variables) == 64 * 32 * 2 + 32 + 2 * per_layer


def test_scan_equals_unrolled():
    c = small(rope_scaling=LLAMA3)
    variables = noisy_init(c)
    scanned = {"params": stack_layers(variables["params"], c.num_layers)}
    ids = random_ids((2, 9))
    sc = dataclasses.replace(c, scan_layers=True)
    assert paths(scanned) == paths(jax.eval_shape(Llama(sc).init, jax.random.key(0), ids))
    np.testing.assert_allclose(
        forward(sc, scanned, ids), forward(c, variables, ids), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("window", [None, 3])
def test_kv_cache_prefill_and_decode_equal_full_forward(scan, window):
    c = small(sliding_window=window, scan_layers=scan)
    params = noisy_init(dataclasses.replace(c, scan_layers=False))["params"]
    variables = {"params": stack_layers(params, c.num_layers) if scan else params}
    model = Llama(c)
    ids = random_ids((2, 11))
    full = forward(c, variables, ids)
    step = jax.jit(lambda v, ids, cache: model.apply(v, ids, cache=cache))
    logits, cache = step(variables, ids[:, :4], init_cache(c, 2, 16))
    outs = [logits]
    for t in range(4, 11):
        logits, cache = step(variables, ids[:, t : t + 1], cache)
        outs.append(logits)
    assert int(cache["end"]) == 11 and cache["k"].shape == (2, 2, 16, 2, 8)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5, rtol=0)


def test_explicit_positions_shift_rope():
    c = small()
    variables = noisy_init(c)
    ids = random_ids((1, 6))
    default = forward(c, variables, ids)
    np.testing.assert_array_equal(forward(c, variables, ids, jnp.arange(6)), default)
    assert not np.allclose(forward(c, variables, ids, jnp.arange(6) + 3), default)


def test_causal():
    c = small()
    variables = noisy_init(c)
    ids = random_ids((2, 10))
    changed = ids.at[:, 6].set((ids[:, 6] + 1) % c.vocab_size)
    a, b = forward(c, variables, ids), forward(c, variables, changed)
    np.testing.assert_array_equal(a[:, :6], b[:, :6])
    assert np.abs(a[:, 6:] - b[:, 6:]).min(axis=-1).max() > 0


@pytest.mark.parametrize("window", [1, 3, 5])
def test_sliding_window_masks_old_tokens(window):
    """One layer: position t sees tokens t-window+1 .. t; token 0 matters only before `window`."""
    c = small(num_layers=1, sliding_window=window)
    variables = noisy_init(c)
    ids = random_ids((1, 8))
    changed = ids.at[:, 0].set((ids[:, 0] + 1) % c.vocab_size)
    diff = np.abs(forward(c, variables, ids) - forward(c, variables, changed)).max(-1)[0]
    assert (diff[:window] > 0).all()
    np.testing.assert_array_equal(diff[window:], 0)


def test_cache_errors():
    c = small()
    with pytest.raises(ValueError, match="max_len` = 64 exceeds the model's max_seq_len = 32"):
        init_cache(c, 1, 64)
    with pytest.raises(ValueError, match="batch_size` must be a positive int"):
        init_cache(c, 0, 8)
    variables = noisy_init(c)
    with pytest.raises(ValueError, match=r"cache\['k'\] must have shape"):
        Llama(c).apply(variables, random_ids((3, 2)), cache=init_cache(c, 2, 8))
    with pytest.raises(ValueError, match="9 tokens do not fit a cache of 8"):
        Llama(c).apply(variables, random_ids((2, 9)), cache=init_cache(c, 2, 8))
    with pytest.raises(TypeError, match="`ids` must be an integer array"):
        Llama(c).apply(variables, jnp.zeros((1, 2)))


# --- config ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, match",
    [
        ({"num_heads": 4, "num_kv_heads": 3}, "multiple of num_kv_heads"),
        ({"hidden_size": 0}, "hidden_size must be a positive int; found 0"),
        ({"vocab_size": 2.5}, "vocab_size must be a positive int"),
        ({"hidden_size": 30}, "not a multiple of num_heads"),
        ({"head_dim": 7}, "head_dim must be even"),
        ({"sliding_window": 0}, "sliding_window must be a positive int"),
        ({"rope_theta": -1.0}, "rope_theta must be a number > 0"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "'yarn' is not supported"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "missing.*low_freq_factor"),
        ({"dtype": "int32"}, "dtype must be a float dtype; found 'int32'"),
        ({"param_dtype": "nonsense"}, "param_dtype must be a float dtype name"),
        ({"tie_embeddings": 1}, "tie_embeddings must be a bool"),
    ],
)
def test_config_validation(change, match):
    with pytest.raises(ValueError, match=match):
        small(**change)


@pytest.mark.parametrize("extra", [{}, {"rope_scaling": LLAMA3, "sliding_window": 4}])
def test_config_json_round_trip_and_hashable(extra):
    c = small(**extra, dtype=jnp.bfloat16)
    assert c.dtype == "bfloat16" and hash(c) == hash(small(**extra, dtype="bfloat16"))
    assert LlamaConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert small(rope_scaling={"rope_type": "default"}).rope_scaling is None


def test_from_dict_errors():
    d = small().to_dict()
    with pytest.raises(ValueError, match=r"unknown keys \['hidden', 'layers'\]"):
        LlamaConfig.from_dict({**d, "hidden": 1, "layers": 2})
    del d["vocab_size"]
    with pytest.raises(ValueError, match=r"missing required keys \['vocab_size'\]"):
        LlamaConfig.from_dict(d)


def test_tiny_preset():
    c = PRESETS["tiny"]
    assert (c.vocab_size, c.hidden_size, c.num_layers, c.head_dim) == (258, 128, 4, 32)
    assert not c.tie_embeddings and c.max_seq_len == 512


# --- LoRA sees every layer -------------------------------------------------------------


@pytest.mark.parametrize("scan, tied", [(False, False), (True, True)])
def test_lora_factored_on_every_projection(scan, tied):
    """all-linear adapts every projection (not lm_head); the embedding too when asked, also
    through ``attend`` when tied. Factored everywhere, and the base output at init."""
    c = small(scan_layers=scan, tie_embeddings=tied)
    model, ids = Llama(c), random_ids((2, 5))
    variables = noisy_init(c)
    layouts = lj.infer_layouts(model.apply, variables, ids)
    layer_names = ["layers"] if scan else [f"layers_{i}" for i in range(c.num_layers)]
    kernels = {f"params/{layer}/{k}/kernel" for layer in layer_names for k in KERNELS}
    head = set() if tied else {"params/lm_head/kernel"}
    assert set(layouts) == kernels | head | {"params/embed_tokens/embedding"}
    config = lj.LoraConfig(rank=4, targets=["all-linear", ".*/embedding"])
    # an "rbg" key: same semantics, a much faster compile on CPU than threefry
    frozen, lora = lj.split(variables, config, key=jax.random.key(0, impl="rbg"), layouts=layouts)
    apply = jax.jit(lj.lora_apply(model.apply))
    np.testing.assert_array_equal(apply(frozen, lora, ids), forward(c, variables, ids))
    routes = lj.routes(model.apply, frozen, lora, ids)
    assert set(routes) == set(layouts) - head
    assert routes["params/embed_tokens/embedding"] == "factored (Embed)"
    assert {routes[p] for p in kernels} == {"factored (Dense)"}
    if not scan:
        return
    cache = init_cache(c, 2, 8)  # with a cache, adapters slice along with the scanned layers
    (logits, _), (base, _) = (
        apply(frozen, lora, ids, cache=cache),
        jax.jit(model.apply)(variables, ids, cache=cache),
    )
    np.testing.assert_array_equal(logits, base)


# --- checkpoints without torch ---------------------------------------------------------


def test_safetensors_bf16_round_trip(tmp_path):
    w = np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16)
    write_safetensors(tmp_path / "a.safetensors", {"w": w, "e": np.zeros((0, 2), np.float16)})
    back = read_safetensors(tmp_path / "a.safetensors")
    assert back["w"].dtype == ml_dtypes.bfloat16 and back["e"].shape == (0, 2)
    np.testing.assert_array_equal(back["w"], w)


@pytest.mark.parametrize("scan", [False, True])
def test_save_load_round_trip(tmp_path, scan):
    c = small(attention_bias=True, rope_scaling=LLAMA3, scan_layers=scan)
    params = noisy_init(dataclasses.replace(c, scan_layers=False))["params"]
    variables = {"params": stack_layers(params, c.num_layers) if scan else params}
    folder = save_pretrained(tmp_path / "model", c, variables)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    loaded_config, loaded = from_pretrained(folder, scan_layers=scan)
    assert loaded_config == c
    jax.tree.map(np.testing.assert_array_equal, loaded, variables)
    half_config, half = from_pretrained(
        save_pretrained(tmp_path / "bf16", c, variables, dtype="bfloat16"),
        dtype="bfloat16",
        scan_layers=scan,
    )
    assert half_config.dtype == "bfloat16"
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(a, b.astype(jnp.bfloat16)), half, variables
    )


def test_save_into_existing_folder_keeps_other_files(tmp_path):
    c = small()
    (tmp_path / "tokenizer.json").write_text("{}")
    save_pretrained(tmp_path, c, noisy_init(c, seed=1))
    save_pretrained(tmp_path, c, noisy_init(c, seed=2))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["config.json", "model.safetensors", "tokenizer.json"]
    jax.tree.map(np.testing.assert_array_equal, from_pretrained(tmp_path)[1], noisy_init(c, seed=2))


def test_hf_state_names():
    c = small(tie_embeddings=True, attention_bias=True)
    state = to_hf_state(c, noisy_init(c))
    assert "lm_head.weight" not in state and "model.layers.1.self_attn.k_proj.bias" in state
    assert state["model.layers.0.mlp.down_proj.weight"].shape == (32, 48)
    state["lm_head.weight"] = np.zeros((64, 32), np.float32)  # tied: ignored
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(4, np.float32)
    params = from_hf_state(c, state, dtype="float16")
    assert params["layers_1"]["self_attn"]["k_proj"]["bias"].dtype == jnp.float16


def test_config_from_hf_layouts():
    base = config_to_hf(small())
    legacy = {k: v for k, v in base.items() if k != "rope_parameters"}
    legacy.update(rope_theta=500.0, rope_scaling=LLAMA3)
    v5 = {k: v for k, v in base.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {**LLAMA3, "rope_theta": 500.0}
    assert (
        config_from_hf(legacy) == config_from_hf(v5) == small(rope_theta=500.0, rope_scaling=LLAMA3)
    )
    qwen = {**base, "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": False}
    assert config_from_hf(qwen).attention_bias and config_from_hf(qwen).sliding_window is None
    mistral = {**base, "architectures": ["MistralForCausalLM"], "sliding_window": 7}
    assert config_from_hf(mistral).sliding_window == 7
    partial = {**qwen, "use_sliding_window": True, "max_window_layers": 1, "sliding_window": 4}
    with pytest.raises(ValueError, match="sliding window on 1 of 2 layers"):
        config_from_hf(partial)


@pytest.fixture
def saved(tmp_path):
    c = small()
    return c, save_pretrained(tmp_path / "m", c, noisy_init(c))


def _rewrite_weights(folder, edit):
    state = dict(read_safetensors(folder / "model.safetensors"))
    edit(state)
    state = {k: np.array(v) for k, v in state.items()}
    write_safetensors(folder / "model.safetensors", state, {"format": "pt"})


def test_load_errors_folder_and_config(tmp_path, saved):
    _, folder = saved
    with pytest.raises(ValueError, match="nowhere: no such folder"):
        from_pretrained(tmp_path / "nowhere")
    hf = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**hf, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(
        ValueError,
        match=r"config.json at .*: architecture 'GPT2LMHeadModel' is not supported; "
        r"supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM",
    ):
        from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**hf, "rope_scaling": {"rope_type": "yarn"}}))
    with pytest.raises(ValueError, match=r"config.json at .*'yarn' is not supported"):
        from_pretrained(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json: not valid JSON"):
        from_pretrained(folder)
    (folder / "config.json").unlink()
    with pytest.raises(ValueError, match=r"config.json: no such file"):
        from_pretrained(folder)


def test_load_errors_tensors(saved):
    _, folder = saved
    _rewrite_weights(folder, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing: \[model.layers.1.mlp.up_proj.weight\]"):
        from_pretrained(folder)
    _rewrite_weights(
        folder,
        lambda s: s.update(
            {
                "model.layers.1.mlp.up_proj.weight": np.zeros((48, 32), np.float32),
                "model.extra.weight": np.zeros(2, np.float32),
            }
        ),
    )
    with pytest.raises(ValueError, match=r"unexpected: \[model.extra.weight\]"):
        from_pretrained(folder)
    _rewrite_weights(folder, lambda s: s.pop("model.extra.weight"))
    from_pretrained(folder)
    _rewrite_weights(folder, lambda s: s.update({"model.norm.weight": np.zeros(31, np.float32)}))
    with pytest.raises(
        ValueError, match=r"'model.norm.weight' has shape \(31,\); the config expects \(32,\)"
    ):
        from_pretrained(folder)


@pytest.mark.parametrize(
    "content, match",
    [
        (b"\x01\x02", "shorter than the 8-byte header length"),
        ((10**9).to_bytes(8, "little") + b"{}", "header length 1000000000 exceeds the file size"),
        ((5).to_bytes(8, "little") + b"nope!", "the header is not JSON"),
        (
            (56).to_bytes(8, "little")
            + b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}} ',
            r"needs 16 bytes but its data_offsets are \[0, 16\] in a 0-byte buffer",
        ),
    ],
)
def test_load_errors_corrupt_file(saved, content, match):
    _, folder = saved
    (folder / "model.safetensors").write_bytes(content)
    with pytest.raises(
        ValueError, match="model.safetensors: not a valid safetensors file.*" + match
    ):
        from_pretrained(folder)


def test_a_truncated_base_file_is_named(saved):
    """Issue 16: a HF base folder whose weights file was cut short (an interrupted copy) is
    a clear error naming the file and the tensor that does not fit, not a crash later."""
    _, folder = saved
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(
        ValueError, match=r"model\.safetensors: not a valid safetensors file .*tensor '"
    ):
        from_pretrained(folder)


def test_load_errors_weights_files(saved):
    _, folder = saved
    state = read_safetensors(folder / "model.safetensors")
    names = sorted(state)
    write_safetensors(folder / "a.safetensors", {n: np.array(state[n]) for n in names[:5]})
    write_safetensors(folder / "b.safetensors", {n: np.array(state[n]) for n in names[5:]})
    weight_map = {n: "a.safetensors" if i < 5 else "b.safetensors" for i, n in enumerate(names)}
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "model.safetensors").unlink()
    from_pretrained(folder)  # sharded
    (folder / "b.safetensors").unlink()
    with pytest.raises(ValueError, match=r"lists shards missing from .*: \['b.safetensors'\]"):
        from_pretrained(folder)
    index.unlink()
    with pytest.raises(ValueError, match=r"no weights; expected model.safetensors"):
        from_pretrained(folder)


def test_save_errors(tmp_path, saved):
    c, folder = saved
    variables = from_pretrained(folder)[1]
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="file: exists and is not a folder"):
        save_pretrained(tmp_path / "file", c, variables)
    with pytest.raises(ValueError, match=r"missing \[layers_2/"):
        save_pretrained(tmp_path / "x", dataclasses.replace(c, num_layers=3), variables)
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="save_pretrained: `dtype` must be float32, bfloat16"):
        save_pretrained(tmp_path / "y", c, variables, dtype="int8")
