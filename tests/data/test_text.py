"""Token streams on the real tiny Shakespeare: nanoGPT's split and sampling, an order
that is a pure function of (seed, epoch, batch), rank shards, and the token cache."""

import shutil

import numpy as np
import pytest
import torch

from tests.conftest import DATA_DIR
from trainer.data import corpora, text
from trainer.data.text import TokenStreamData, window_starts
from trainer.data.tokenizers import CharTokenizer
from trainer.error_messages import describe_user_error
from trainer.errors import ConfigError

TINY = DATA_DIR / "tinyshakespeare" / "input.txt"
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch):
    if not TINY.is_file():
        pytest.skip(f"tiny Shakespeare not found at {TINY}; set TRAINER_DATA_DIR")
    cache = tmp_path / "user_cache"
    monkeypatch.setenv(corpora.CACHE_ENV, str(cache))
    return cache


def make(**kwargs) -> TokenStreamData:
    config = dict(data_dir=str(DATA_DIR), vocab_size=65, block_size=64, batch_size=12)
    data = TokenStreamData(**{**config, **kwargs})
    data.setup(CPU)
    return data


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        for x, y in zip(a, b, strict=True)
    )


def test_split_windows_and_labels_are_nanogpts(user_cache):
    data = make(block_size=256, batch_size=64)
    corpus = TINY.read_text(encoding="utf-8")
    train, val = data.splits["train"], data.splits["val"]
    assert (len(train), len(val)) == (1_003_854, 111_540)  # nanoGPT's prepare.py figures
    assert data.tokenizer.decode(train[:500].tolist()) == corpus[:500]
    assert data.tokenizer.decode(val[:500].tolist()) == corpus[1_003_854:1_004_354]
    assert data.has_test is False and data.batch_size == 64
    assert len(data.batches("train")) == 1_003_854 // (64 * 256)

    batch = next(data.batches("train", seed=3).epoch(0))
    starts = window_starts(3, 0, 0, 64, len(train) - 256)
    x, y = batch["input_ids"], batch["labels"]
    assert x.shape == y.shape == (64, 256) and x.dtype == y.dtype == torch.long
    for row, s in enumerate(starts.tolist()):  # nanoGPT: x = data[i:i+T], y = data[i+1:i+1+T]
        assert torch.equal(x[row], train[s : s + 256]) and torch.equal(
            y[row], train[s + 1 : s + 257]
        )
    # The shared data folder is read-only: the cache went to the user cache, not beside it.
    assert not (TINY.parent / "token_cache").exists()
    assert len(list((user_cache / "tokens").glob("shakespeare_char-*.uint16.bin"))) == 2


def test_start_positions_are_uniform_like_nanogpts():
    # nanoGPT: torch.randint(len(data) - block_size, (batch_size,)) each batch.
    high = 1_003_854 - 256
    starts = torch.cat([window_starts(0, 0, b, 64, high) for b in range(2000)]).double()
    assert starts.min() >= 0 and starts.max() <= high - 1
    counts = torch.histc(starts, bins=20, min=0, max=high)
    expected = len(starts) / 20
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 45  # 19 degrees of freedom: p < 1e-3 for a uniform draw
    # Batches are independent draws, not overlapping slices of one permutation.
    assert not torch.equal(window_starts(0, 0, 1, 64, high), window_starts(0, 0, 0, 64, high))


def test_order_is_a_pure_function_of_seed_epoch_batch():
    data = make(epoch_batches=6)
    first = list(data.batches("train", seed=7).epoch(2))
    # A fresh module and a fresh iterator reproduce it exactly.
    assert same(first, list(make(epoch_batches=6).batches("train", seed=7).epoch(2)))
    # Resuming at batch 4 of the epoch yields exactly what continuing would have.
    assert same(first[4:], list(data.batches("train", seed=7).epoch(2, start_batch=4)))
    assert not same(first, list(data.batches("train", seed=7).epoch(3)))
    assert not same(first, list(data.batches("train", seed=8).epoch(2)))
    # Off-device gathering from the memmap gives the very same batches.
    memmap = make(epoch_batches=6, in_memory=False)
    assert isinstance(memmap.splits["train"], np.ndarray)
    assert same(first, list(memmap.batches("train", seed=7).epoch(2)))
    assert len(data.batches("train", limit_batches=2)) == 2


def test_rank_shards_are_disjoint_chunks_of_the_global_batch():
    one = make(batch_size=8, eval_batch_size=10)
    two = make(batch_size=4, eval_batch_size=5)
    assert len(two.batches("train", world_size=2)) == 1_003_854 // (8 * 64)
    single = list(one.batches("train", seed=1, limit_batches=3).epoch(5))
    ranks = [
        list(two.batches("train", seed=1, rank=r, world_size=2, limit_batches=3).epoch(5))
        for r in range(2)
    ]
    for b, whole in enumerate(single):
        for key in ("input_ids", "labels"):
            assert torch.equal(torch.cat([ranks[0][b][key], ranks[1][b][key]]), whole[key])
    # Validation: every window once, split between the ranks with none shared.
    val = [list(two.batches("val", rank=r, world_size=2).epoch(0)) for r in range(2)]
    rows = [tuple(row.tolist()) for r in val for b in r for row in b["input_ids"]]
    assert len(rows) == len(set(rows)) == one.val_size == (111_540 - 1) // 64
    joined = torch.cat(
        [torch.cat([val[0][b]["input_ids"], val[1][b]["input_ids"]]) for b in range(len(val[0]))]
    )
    single_val = torch.cat([b["input_ids"] for b in one.batches("val").epoch(0)])
    assert torch.equal(joined, single_val)


def test_validation_windows_are_fixed_and_spread():
    data = make(val_windows=20, eval_batch_size=8)
    batches = list(data.batches("val").epoch(0))
    assert [len(b["input_ids"]) for b in batches] == [8, 8, 4]
    assert same(batches, list(data.batches("val", seed=99).epoch(3)))
    starts = data.val_starts
    assert starts[0] == 0 and starts[-1] == 111_540 - 65 and bool((starts.diff() > 0).all())


def test_cache_is_keyed_by_content_and_tokenizer(tmp_path, monkeypatch):
    own = tmp_path / "corpus" / "plays.txt"
    own.parent.mkdir()
    shutil.copy(TINY, own)
    data = make(corpus=str(own))
    cache = own.parent / "token_cache"  # beside the data when the folder is writable
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 2 and all(n.startswith("plays-") for n in files)

    def refuse(self, text):
        raise AssertionError("tokenized again although the cache holds these tokens")

    with monkeypatch.context() as m:
        m.setattr(CharTokenizer, "encode_array", refuse)
        cached = make(corpus=str(own))
    assert torch.equal(cached.splits["train"], data.splits["train"])

    # Same length, same characters, other content: a new cache, and the new tokens.
    body = own.read_text()
    own.write_text(body.replace("ROMEO", "OMERO"))
    changed = make(corpus=str(own))
    assert len(list(cache.iterdir())) == 4
    assert not torch.equal(changed.splits["train"], data.splits["train"])
    assert (
        changed.tokenizer.decode(changed.splits["train"][:3000].tolist()) == own.read_text()[:3000]
    )
    # A new character changes the tokenizer (66 characters) and so the key again.
    own.write_text(body + "é")
    assert make(corpus=str(own), vocab_size=66).tokenizer.vocab_size == 66
    assert len(list(cache.iterdir())) == 6
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]


def test_read_only_data_folder_caches_in_the_user_cache(tmp_path, user_cache):
    folder = tmp_path / "data" / "tinyshakespeare"
    folder.mkdir(parents=True)
    shutil.copy(TINY, folder / "input.txt")
    folder.chmod(0o555)
    try:
        data = make(data_dir=str(tmp_path / "data"))
        again = make(data_dir=str(tmp_path / "data"))
        assert [p.name for p in folder.iterdir()] == ["input.txt"]
    finally:
        folder.chmod(0o755)
    assert len(list((user_cache / "tokens").iterdir())) == 2
    assert torch.equal(again.splits["val"], data.splits["val"])


BAD_CONFIGS = [
    (
        dict(vocab_size=50),
        "data.vocab_size=50 but shakespeare_char has 65 distinct characters; "
        "set data.vocab_size=65",
    ),
    (
        dict(block_size=200_000),
        "data.block_size=200000 is too long for the val split of shakespeare_char (111540 "
        "tokens; a window needs block_size + 1); set data.block_size to at most 111539",
    ),
    (dict(val_fraction=1.5), "data.val_fraction=1.5 must be in [0, 1)"),
    (dict(batch_size=0), "data.batch_size=0 must be an integer >= 1"),
]


@pytest.mark.parametrize("kwargs, message", BAD_CONFIGS)
def test_bad_config_is_one_line(kwargs, message):
    with pytest.raises(ConfigError) as e:
        make(**kwargs)
    line = describe_user_error(e.value)
    assert line.startswith(message) and "\n" not in str(e.value)


def test_no_validation_split():
    data = make(val_fraction=0.0)
    assert data.val_size == 0 and len(data.splits["train"]) == 1_115_394
    with pytest.raises(ValueError, match="no 'val' split"):
        data.batches("val")
    assert text.split_text("abcdefghij", 0.1) == ("abcdefghi", "j")


@pytest.mark.parametrize("name, vocab", [("shakespeare_char", 65), ("shakespeare_complete", 84)])
def test_data_configs_instantiate(name, vocab):
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    with initialize_config_module("trainer.configs", version_base="1.3"):
        cfg = compose(f"data/{name}", overrides=[f"+paths.data_dir={DATA_DIR}"])
    data = instantiate(cfg.data)
    assert isinstance(data, TokenStreamData) and data.corpus_name == name
    assert (data.vocab_size, data.block_size, data.batch_size) == (vocab, 256, 64)
    assert data.tokenizer_spec == "char" and data.data_dir == str(DATA_DIR)


@pytest.mark.slow
def test_hugging_face_tokenizer_streams(tiny_llama_dir, tmp_path):
    own = tmp_path / "plays.txt"
    corpus = TINY.read_text(encoding="utf-8")[:200_000]
    own.write_text(corpus, encoding="utf-8")
    char = make(corpus=str(own), vocab_size=len(set(corpus)))
    bpe = make(corpus=str(own), tokenizer=str(tiny_llama_dir), vocab_size=None)
    assert bpe.vocab_size == bpe.tokenizer.vocab_size == 384
    assert bpe.tokenizer.decode(bpe.splits["train"].tolist()) == corpus[:180_000]
    assert bpe.tokenizer.decode(bpe.splits["val"].tolist()) == corpus[180_000:]
    assert len(bpe.splits["train"]) < 0.7 * len(char.splits["train"])  # merges at work
    names = sorted(p.name for p in (tmp_path / "token_cache").iterdir())
    assert len(names) == 4 and len({n.split("-")[2] for n in names}) == 2  # two tokenizers
    batch = next(bpe.batches("train").epoch(0))
    assert batch["input_ids"].shape == (12, 64) and int(batch["input_ids"].max()) < 384
    with pytest.raises(ConfigError, match="set data.vocab_size=384 \\(or larger\\)"):
        make(corpus=str(own), tokenizer=str(tiny_llama_dir), vocab_size=300)
