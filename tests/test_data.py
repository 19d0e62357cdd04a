"""Tokenizers and the data pipeline of the training app: reading, packing, batching, resuming."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from train import data, sources
from train.data import Packed
from train.sources import Document
from train.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Packing joins documents into windows of fixed length.",
    "Héllo wörld, naïve café — ünïcode text ✓.",
    "def add(a, b):\n    return a + b\n",
] * 5


class DigitTokenizer:
    """Digits are ids 0-9, EOS is 10, no BOS, no encode_batch (exercises the fallbacks)."""

    name = "digits"
    vocab_size = 11
    bos_id = None
    eos_id = 10

    def encode(self, text: str) -> np.ndarray:
        return np.array([int(c) for c in text], np.int32)

    def decode(self, ids) -> str:
        return "".join(str(i) for i in ids if i < 10)


def numbered(num_windows: int, seq_len: int = 3) -> Packed:
    """Windows whose tokens all equal their row number, so a batch tells which rows it holds."""
    rows = np.repeat(np.arange(num_windows, dtype=np.int32)[:, None], seq_len + 1, axis=1)
    return Packed(tokens=rows, weights=np.ones(rows.shape, np.float32), num_documents=1,
                  num_tokens=num_windows * seq_len + 1)  # fmt: skip


def rows_of(batch: dict) -> list[int]:
    return batch["inputs"][:, 0].tolist()


def take(loader, n: int) -> list[dict]:
    return [next(loader) for _ in range(n)]


# Tokenizers -----------------------------------------------------------------------------


def test_byte_tokenizer_round_trip_and_specials():
    tok = ByteTokenizer()
    text = "héllo, wörld ✓ 🙂\n\ttabs"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.tolist() == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id, *ids.tolist(), tok.eos_id]) == text
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.name) == (258, 256, 257, "byte")
    assert tok.decode([0xE2, 0x9C]) == "\ufffd"  # a cut multi-byte character never raises
    assert isinstance(tok, Tokenizer)
    with pytest.raises(ValueError, match=r"token id 258 is outside the vocabulary \[0, 258\)"):
        tok.decode([97, 258])


def test_byte_tokenizer_encodes_megabytes_fast():
    ids = ByteTokenizer().encode("abc✓" * 500_000)
    assert ids.shape == (3_000_000,)


@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory) -> pathlib.Path:
    """A small byte-level BPE trained here, with <s> / </s> and a tokenizer_config.json."""
    folder = tmp_path_factory.mktemp("bpe")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(SENTENCES, trainer)
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": {"content": "</s>", "special": True}}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_hf_tokenizer_round_trip_and_special_ids(bpe_folder):
    for spec in (bpe_folder, bpe_folder / "tokenizer.json", str(bpe_folder)):
        tok = load_tokenizer(spec)
        assert isinstance(tok, HFTokenizer)
        assert (tok.bos_id, tok.eos_id) == (0, 1)
        assert tok.name == str(bpe_folder / "tokenizer.json")
    tok = HFTokenizer(bpe_folder)
    text = "Héllo wörld, the lazy fox ✓ 🙂"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and 0 not in ids and 1 not in ids  # no specials added
    assert len(ids) < len(text.encode())  # merges were learned
    assert tok.decode(ids) == text
    assert tok.decode([0, *ids.tolist(), 1]) == text
    batch = tok.encode_batch([text, "", SENTENCES[0]])
    assert [b.tolist() for b in batch] == [tok.encode(t).tolist() for t in (text, "", SENTENCES[0])]
    assert load_tokenizer(tok.name).vocab_size == tok.vocab_size


def test_hf_tokenizer_reads_ids_from_model_configs(bpe_folder, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((bpe_folder / "tokenizer.json").read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [1, 5]}))
    tok = HFTokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id) == (None, 1)
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 0}))
    assert HFTokenizer(tmp_path).bos_id == 0
    assert HFTokenizer(tmp_path, bos_id=7, eos_id=8).eos_id == 8


def test_hf_tokenizer_errors(bpe_folder, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((bpe_folder / "tokenizer.json").read_bytes())
    with pytest.raises(ValueError, match=r"no EOS token found.*tokenizer_config\.json.*config"):
        HFTokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    with pytest.raises(ValueError, match=r"eos_token '<eos>' is not in the vocabulary"):
        HFTokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: not valid JSON"):
        HFTokenizer(tmp_path)
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(ValueError, match=r"broken\.json: cannot load"):
        load_tokenizer(tmp_path / "broken.json")


def test_load_tokenizer_rejects_other_specs(tmp_path):
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    with pytest.raises(ValueError, match=r"'.*missing'.*expected 'byte'.*nothing at that path"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"a folder without tokenizer\.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(TypeError, match="string or path; got int"):
        load_tokenizer(3)  # type: ignore[arg-type]


# Packing ----------------------------------------------------------------------------------


def test_pack_matches_hand_computed_reference():
    packed = data.pack_documents(["ab", "c"], ByteTokenizer(), seq_len=3)
    # stream: <s> a b </s> <s> c </s>; windows of 4 with stride 3 share one token
    assert packed.tokens.tolist() == [[256, 97, 98, 257], [257, 256, 99, 257]]
    assert packed.weights.tolist() == [[0, 1, 1, 1], [1, 0, 1, 1]]
    assert packed.tokens.dtype == np.int32 and packed.weights.dtype == np.float32
    assert (packed.num_windows, packed.seq_len, packed.num_tokens) == (2, 3, 7)


def test_pack_drops_the_partial_tail_and_summarizes():
    packed = data.pack_documents(["abcd"], ByteTokenizer(), seq_len=2)
    assert packed.tokens.tolist() == [[256, 97, 98], [98, 99, 100]]  # EOS is in the tail
    assert data.data_summary(packed) == {
        "documents": 1, "tokens": 6, "windows": 2, "seq_len": 2, "trained_tokens": 4,
        "dropped_tokens": 1,
    }  # fmt: skip


def test_pack_without_bos_and_without_encode_batch():
    packed = data.pack_documents(["12", "345"], DigitTokenizer(), seq_len=6)
    assert packed.tokens.tolist() == [[1, 2, 10, 3, 4, 5, 10]]
    assert packed.weights.tolist() == [[1] * 7]


def test_prompt_tokens_and_bos_carry_no_loss():
    doc = Document("cd", prompt="ab")
    packed = data.pack_documents([doc], ByteTokenizer(), seq_len=5)
    assert packed.tokens.tolist() == [[256, 97, 98, 99, 100, 257]]
    batch = next(data.eval_batches(packed, batch_size=1))
    assert batch["targets"].tolist() == [[97, 98, 99, 100, 257]]
    assert batch["weights"].tolist() == [[0, 0, 1, 1, 1]]  # a, b unweighted; c, d, EOS trained
    assert batch["inputs"].tolist() == [[256, 97, 98, 99, 100]]


def test_pack_errors(tmp_path):
    (tmp_path / "short.txt").write_text("tiny")
    docs = sources.load_documents(tmp_path / "short.txt")
    with pytest.raises(ValueError, match=r"1 document\(s\) from .*short\.txt give 6 tokens.*= 65"):
        data.pack_documents(docs, ByteTokenizer(), seq_len=64)
    with pytest.raises(ValueError, match="seq_len must be a positive int; got 0"):
        data.pack_documents(["abc"], ByteTokenizer(), seq_len=0)
    with pytest.raises(TypeError, match=r"docs\[1\]: expected a str or Document, found bytes"):
        data.pack_documents(["abc", b"x"], ByteTokenizer(), seq_len=2)  # type: ignore[list-item]
    too_small = type("TooSmall", (DigitTokenizer,), {"vocab_size": 5})()
    with pytest.raises(ValueError, match=r"'digits' produced ids in \[1, 10\], outside .*\[0, 5\)"):
        data.pack_documents(["9", "1"], too_small, seq_len=1)


# Sources ----------------------------------------------------------------------------------


def test_jsonl_text_and_prompt_completion(tmp_path):
    path = tmp_path / "qa.jsonl"
    lines = [
        {"text": "plain text"},
        {"prompt": "Q: 2+2?", "completion": " 4", "id": 7},
        {"text": "line\u2028separator inside a string"},
    ]
    path.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n\n")
    docs = sources.load_documents(path)
    assert docs == [
        Document("plain text", source=str(path)),
        Document(" 4", prompt="Q: 2+2?", source=str(path)),
        Document("line\u2028separator inside a string", source=str(path)),
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"text": "ok"', "invalid JSON"),
        ('{"prompt": "only a prompt"}', r"found \{'prompt': 'str'\}"),
        ('{"text": 3}', r"found \{'text': 'int'\}"),
        ('{"text": "a", "prompt": "b", "completion": "c"}', "expected a JSON object"),
        ('["text"]', "found list"),
    ],
)
def test_malformed_jsonl_line_is_named(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n' + line + "\n")
    with pytest.raises(ValueError, match=rf"bad\.jsonl:3: .*{message}"):
        sources.load_documents(path)


def test_folders_are_read_recursively_in_sorted_order(tmp_path):
    for name, text in [("b/z.md", "zed"), ("a.txt", "first"), ("b/a.py", "x = 1"), ("c", "c")]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "b" / "image.png").write_bytes(bytes(range(256)))
    (tmp_path / "b" / "nul.txt").write_text("valid utf-8 but\x00binary")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref: hidden")
    corpus = sources.load_corpus([tmp_path])
    assert [d.text for d in corpus.documents] == ["first", "x = 1", "zed", "c"]
    assert len(corpus.skipped) == 3 and len(corpus.files) == 4
    assert sources.load_corpus(str(tmp_path)) == corpus
    packed = data.pack_documents(corpus.documents, ByteTokenizer(), seq_len=4)
    assert data.data_summary(packed, corpus)["skipped_files"] == 3


def test_nothing_usable_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"'.*nope' does not exist; expected a UTF-8 text file"):
        sources.load_documents([tmp_path / "nope"])
    (tmp_path / "blob.bin").write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(ValueError, match=r"no usable text in .*1 file\(s\) found"):
        sources.load_documents(tmp_path)
    (tmp_path / "blob.jsonl").write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match=r"blob\.jsonl: a \.jsonl file must be UTF-8"):
        sources.load_documents(tmp_path / "blob.jsonl")


def test_builtin_corpora():
    topics = sources.pydoc_topics()
    assert len(topics) > 50 and all(isinstance(t, str) for t in topics)
    assert sum(len(t) for t in topics) > 300_000
    train, held_out = sources.stdlib_code_files("train"), sources.stdlib_code_files("eval")
    assert train == sources.stdlib_code_files("train")  # deterministic
    assert held_out and not set(train) & set(held_out)
    assert 0.02 < len(held_out) / (len(train) + len(held_out)) < 0.10
    for path in train + held_out:
        assert path.suffix == ".py" and not path.name.startswith("test_")
        assert not {"test", "tests", "idle_test", "site-packages"} & set(path.parts)
    with pytest.raises(ValueError, match="split must be 'train' or 'eval'; got 'val'"):
        sources.stdlib_code_files("val")
    packed = data.pack_documents(sources.load_documents(held_out), ByteTokenizer(), seq_len=128)
    assert packed.num_windows > 1000


def test_pack_with_a_trained_bpe(bpe_folder):
    tok = load_tokenizer(bpe_folder)
    packed = data.pack_documents([Document("fox", prompt="The quick "), "lazy dog"], tok, seq_len=4)
    stream = [0, *tok.encode("The quick "), *tok.encode("fox"), 1, 0, *tok.encode("lazy dog"), 1]
    assert packed.tokens[0].tolist() == stream[:5]
    assert packed.weights[0, 0] == 0 and packed.weights.sum() > 0


# Loader -----------------------------------------------------------------------------------


def test_loader_batches_are_shaped_and_deterministic():
    packed = data.pack_documents(SENTENCES, ByteTokenizer(), seq_len=16)
    a, b = (data.make_loader(packed, batch_size=4, seed=3) for _ in range(2))
    for x, y in zip(take(a, 10), take(b, 10), strict=True):
        assert {k: v.dtype for k, v in x.items()} == {
            "inputs": np.int32, "targets": np.int32, "weights": np.float32,
        }  # fmt: skip
        assert all(v.shape == (4, 16) for v in x.values())
        assert all(np.array_equal(x[k], y[k]) for k in x)
        assert np.array_equal(x["inputs"][:, 1:], x["targets"][:, :-1])


def test_different_seeds_differ_and_epochs_reshuffle():
    packed = numbered(40)
    epochs = [rows_of(b) for b in take(data.make_loader(packed, batch_size=40, seed=0), 3)]
    assert all(sorted(e) == list(range(40)) for e in epochs)  # each epoch sees every window
    assert epochs[0] != epochs[1] != epochs[2] != epochs[0]
    other = rows_of(next(data.make_loader(packed, batch_size=40, seed=1)))
    assert other != epochs[0] and other != epochs[1]  # not the neighbouring seed's next epoch


def test_finite_epochs_and_progress():
    loader = data.make_loader(numbered(10), batch_size=4, seed=0, num_epochs=2)
    batches = list(loader)
    assert len(batches) == loader.num_batches == 5  # 20 positions, the last partial batch dropped
    assert loader.step == 5 and loader.epoch == 2.0
    assert data.make_loader(numbered(10), batch_size=4, seed=0).num_batches is None


def test_state_restores_exactly_through_json():
    packed = numbered(11)
    loader = data.make_loader(packed, batch_size=3, seed=5)
    take(loader, 5)
    state = json.loads(json.dumps(loader.get_state()))
    expected = take(loader, 3)  # crosses an epoch boundary (positions 15..23 of 11 per epoch)
    fresh = data.make_loader(packed, batch_size=3, seed=5)
    fresh.set_state(state)
    assert fresh.step == 5 and fresh.epoch == pytest.approx(15 / 11)
    for x, y in zip(take(fresh, 3), expected, strict=True):
        assert all(np.array_equal(x[k], y[k]) for k in x)


def test_state_from_other_data_or_seed_is_refused():
    state = data.make_loader(numbered(11), batch_size=3, seed=5).get_state()
    with pytest.raises(ValueError, match=r"seed=5 but this loader has 6"):
        data.make_loader(numbered(11), batch_size=3, seed=6).set_state(state)
    with pytest.raises(ValueError, match=r"num_windows=11 but this loader has 12"):
        data.make_loader(numbered(12), batch_size=3, seed=5).set_state(state)
    with pytest.raises(ValueError, match=r"global_batch_size=3 but this loader has 4"):
        data.make_loader(numbered(11), batch_size=2, seed=5, shard_count=2).set_state(state)
    changed = numbered(11)
    changed.tokens[4] += 1  # same size, other content
    with pytest.raises(ValueError, match=r"tokens_crc32=\d+ but this loader has \d+"):
        data.make_loader(changed, batch_size=3, seed=5).set_state(state)
    partial = {key: value for key, value in state.items() if key != "grain"}
    with pytest.raises(ValueError, match=r"lacks \['grain'\]"):
        data.make_loader(numbered(11), batch_size=3, seed=5).set_state(partial)
    with pytest.raises(TypeError, match="must be a dict; got str"):
        data.make_loader(numbered(11), batch_size=3, seed=5).set_state("step 5")  # type: ignore[arg-type]


@pytest.mark.parametrize("shard_count", [2, 4])
def test_shards_concatenate_to_the_single_process_batch(shard_count):
    packed = numbered(29)
    single = data.make_loader(packed, batch_size=2 * shard_count, seed=9)
    shards = [
        data.make_loader(packed, batch_size=2, seed=9, shard_index=i, shard_count=shard_count)
        for i in range(shard_count)
    ]
    for step in range(12):  # several epochs, batches crossing epoch boundaries
        whole = next(single)
        parts = [next(s) for s in shards]
        for key in whole:
            assert np.array_equal(np.concatenate([p[key] for p in parts]), whole[key])
        if step == 0:
            seen = [r for p in parts for r in rows_of(p)]
            assert len(set(seen)) == len(seen)  # disjoint slices
    state = shards[1].get_state()
    assert all(s.get_state() == state for s in shards)  # one state resumes every process
    regrouped = data.make_loader(packed, batch_size=2 * shard_count, seed=9)
    regrouped.set_state(state)  # the same global batch split differently
    assert np.array_equal(next(regrouped)["inputs"], next(single)["inputs"])


def test_sharded_finite_epochs_agree_on_length():
    def length(shard_index: int) -> int:
        return len(list(data.make_loader(
            numbered(13), batch_size=2, seed=0, shard_index=shard_index, shard_count=3,
            num_epochs=1,
        )))  # fmt: skip

    assert [length(i) for i in range(3)] == [13 // 6] * 3


def test_loader_argument_errors():
    packed = numbered(8)
    with pytest.raises(ValueError, match=r"global batch size 12 \(batch_size=3 x shard_count=4\)"):
        data.make_loader(packed, batch_size=3, seed=0, shard_count=4)
    with pytest.raises(ValueError, match=r"shard_index must be in \[0, 2\); got 2"):
        data.make_loader(packed, batch_size=1, seed=0, shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="batch_size must be a positive int; got 0"):
        data.make_loader(packed, batch_size=0, seed=0)
    with pytest.raises(TypeError, match="seed must be an int; got float"):
        data.make_loader(packed, batch_size=1, seed=0.5)  # type: ignore[arg-type]


# Evaluation batches -----------------------------------------------------------------------


def test_eval_batches_cover_every_window_once():
    packed = numbered(10)
    batches = list(data.eval_batches(packed, batch_size=4))
    assert len(batches) == 3 and all(b["inputs"].shape == (4, 3) for b in batches)
    real = np.concatenate([b["weights"] for b in batches]).any(axis=1)
    assert real.tolist() == [True] * 10 + [False] * 2  # two zero-weight padding rows
    rows = np.concatenate([b["inputs"][:, 0] for b in batches])[real]
    assert rows.tolist() == list(range(10))
    assert rows_of(batches[0]) == rows_of(next(data.eval_batches(packed, batch_size=4)))
    assert len(list(data.eval_batches(packed, batch_size=4, max_batches=2))) == 2
    with pytest.raises(ValueError, match="max_batches must be a positive int; got 0"):
        data.eval_batches(packed, batch_size=4, max_batches=0)
