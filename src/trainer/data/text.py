"""Token streams for language models: a corpus as windows of `block_size + 1` ids.

The corpus is split as nanoGPT splits it (the first 90 % of the characters
train, the rest validate), each part tokenized once into a cached memmap (see
token_cache.py). A training batch is `batch_size` windows at random start
positions drawn uniformly from [0, n - block_size), as nanoGPT's get_batch
draws them, but from a generator seeded by (seed, epoch, batch) alone: resume
is exact, and the order does not depend on the device. An "epoch" is a fixed
number of such batches (by default as many as cover the training tokens once).
Validation uses one fixed set of windows. Batches are dicts of device tensors:
`input_ids` (B, T) and `labels` (B, T), the labels already shifted by one.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator

import numpy as np
import torch

from trainer.data.corpora import load_corpus
from trainer.data.token_cache import cache_dirs, cache_name, cached_tokens, text_digest, token_dtype
from trainer.data.tokenizers import CHAR, CharTokenizer, HFTokenizer, build_tokenizer
from trainer.errors import ConfigError

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


def window_starts(seed: int, epoch: int, batch: int, count: int, high: int) -> torch.Tensor:
    """`count` start positions in [0, high), a pure function of (seed, epoch, batch)."""
    key = hashlib.blake2b(f"{seed}/{epoch}/{batch}".encode(), digest_size=8).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(key, "little") >> 1)
    return torch.randint(high, (count,), generator=generator)


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """nanoGPT's split: the first int(n * 0.9) characters train, the rest validate."""
    n = int(len(text) * (1 - val_fraction))
    return text[:n], text[n:]


class TokenBatches:
    """Windows of `block_size + 1` tokens cut from one split, as dict batches.

    Training (`starts=None`): each batch draws `batch_size * world_size` starts and
    rank r takes the r-th chunk, so the ranks' windows are disjoint positions of one
    global batch, the batch a single process with the global batch size sees.
    Evaluation: the fixed `starts`, `batch_size * world_size` per step, chunked the
    same way.
    """

    def __init__(
        self,
        tokens: torch.Tensor | np.ndarray,
        block_size: int,
        batch_size: int,
        device: torch.device,
        num_batches: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        starts: torch.Tensor | None = None,
        limit_batches: int | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.device, self.seed, self.rank, self.world_size = device, seed, rank, world_size
        self.starts = starts
        self.global_batch = batch_size * world_size
        self.num_batches = min(num_batches, limit_batches) if limit_batches else num_batches
        self.high = len(tokens) - block_size  # starts in [0, high) leave block_size + 1 tokens
        span = torch.arange(block_size + 1)
        # Device tokens are gathered on the device; a memmap is gathered by numpy on the host.
        self.on_device = isinstance(tokens, torch.Tensor)
        self.span = span.to(device) if self.on_device else span.numpy()

    def __len__(self) -> int:
        return self.num_batches

    def batch_starts(self, epoch: int, batch: int) -> torch.Tensor:
        """This rank's window starts for `batch` of `epoch` (CPU int64)."""
        if self.starts is None:
            starts = window_starts(self.seed, epoch, batch, self.global_batch, self.high)
            return starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        chunk = self.starts[batch * self.global_batch : (batch + 1) * self.global_batch]
        return chunk.tensor_split(self.world_size)[self.rank]

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        for b in range(start_batch, self.num_batches):
            yield self.windows(self.batch_starts(epoch, b))

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        # A copy from pageable memory would make the host wait for the GPU every step;
        # from pinned memory it is queued on the stream and the host runs ahead.
        if self.device.type == "cuda":
            return host.pin_memory().to(self.device, non_blocking=True)
        return host.to(self.device)

    def windows(self, starts: torch.Tensor) -> Batch:
        if self.on_device:
            index = (self._to_device(starts)[:, None] + self.span).view(-1)
            w = self.tokens.index_select(0, index).view(len(starts), -1)  # type: ignore[union-attr]
        else:
            w = torch.from_numpy(self.tokens[starts.numpy()[:, None] + self.span].astype(np.int64))
            w = self._to_device(w)
        return {"input_ids": w[:, :-1].contiguous(), "labels": w[:, 1:].contiguous()}


class TokenStreamData:
    """A text corpus as token windows; the `data` config group's language-model module.

    `corpus`: a known name (shakespeare_char, shakespeare_complete) or the path of a
    UTF-8 text file. `tokenizer`: `char` (vocabulary = the corpus' sorted characters,
    as nanoGPT builds it) or a Hugging Face name/path. `vocab_size` is the model's
    vocabulary: the char vocabulary exactly, or at least the HF tokenizer's size
    (padding it, as nanoGPT's 50304 for GPT-2, is allowed).
    """

    has_test = False

    def __init__(
        self,
        corpus: str = "shakespeare_char",
        data_dir: str = "./data",
        tokenizer: str = CHAR,
        vocab_size: int | None = None,
        block_size: int = 256,
        batch_size: int = 64,
        eval_batch_size: int = 64,
        val_fraction: float = 0.1,
        val_windows: int | None = None,
        epoch_batches: int | None = None,
        in_memory: bool = True,
        cache_dir: str | None = None,
        download: bool = True,
        mirrors: list[str] | None = None,
        download_timeout: float = 10.0,
        download_retries: int = 2,
    ) -> None:
        for key, value in (
            ("block_size", block_size),
            ("batch_size", batch_size),
            ("eval_batch_size", eval_batch_size),
            ("val_windows", val_windows or 1),
            ("epoch_batches", epoch_batches or 1),
        ):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"data.{key}={value} must be an integer >= 1")
        if not 0 <= val_fraction < 1:
            raise ConfigError(f"data.val_fraction={val_fraction} must be in [0, 1), e.g. 0.1")
        self.corpus_name, self.data_dir, self.tokenizer_spec = str(corpus), data_dir, tokenizer
        self.vocab_size, self.block_size = vocab_size, block_size
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_fraction, self.val_windows = val_fraction, val_windows
        self.epoch_batches, self.in_memory, self.cache_dir = epoch_batches, in_memory, cache_dir
        self.download, self.mirrors = download, None if mirrors is None else list(mirrors)
        self.download_timeout, self.download_retries = download_timeout, download_retries
        self.tokenizer: CharTokenizer | HFTokenizer | None = None
        self.splits: dict[str, torch.Tensor | np.ndarray] = {}
        self.val_starts = torch.zeros(0, dtype=torch.long)
        self.val_size = 0

    def setup(self, device: torch.device) -> None:
        """Load and verify the corpus, tokenize it (or read the cache), check the sizes."""
        corpus = load_corpus(
            self.corpus_name, self.data_dir, self.mirrors, self.download,
            self.download_timeout, self.download_retries,
        )  # fmt: skip
        tokenizer = build_tokenizer(self.tokenizer_spec, corpus.text)
        self._check_vocab(tokenizer, corpus.name)
        train_text, val_text = split_text(corpus.text, self.val_fraction)
        sha = text_digest(corpus.text)
        dirs = cache_dirs(corpus.path, self.cache_dir)
        parts = {"train": train_text}
        if self.val_fraction:
            parts["val"] = val_text
        self.splits = {}
        for split, text in parts.items():
            name = cache_name(
                corpus.name, sha, tokenizer.fingerprint, f"{split}{self.val_fraction:g}",
                token_dtype(tokenizer.vocab_size),
            )  # fmt: skip
            ids = cached_tokens(
                name, dirs, lambda t=text: tokenizer.encode_array(t), tokenizer.vocab_size
            )
            self._check_block(corpus.name, split, len(ids))
            if self.in_memory:
                # int64 on the device: index_select gathers a batch with no host copy.
                ids = torch.from_numpy(np.asarray(ids).astype(np.int64)).to(device)
            self.splits[split] = ids
        self.tokenizer, self.device = tokenizer, device
        if "val" in self.splits:
            self.val_starts = self._val_starts(len(self.splits["val"]))
        self.val_size = len(self.val_starts)
        log.info(
            "%s (%s): %s train / %s val tokens, vocabulary %d, %d validation windows of %d",
            corpus.name, corpus.path, len(self.splits["train"]),
            len(self.splits.get("val", ())), tokenizer.vocab_size, self.val_size, self.block_size,
        )  # fmt: skip

    def _check_vocab(self, tokenizer: CharTokenizer | HFTokenizer, corpus: str) -> None:
        have, want = tokenizer.vocab_size, self.vocab_size
        if isinstance(tokenizer, CharTokenizer) and want != have:
            raise ConfigError(
                f"data.vocab_size={want} but {corpus} has {have} distinct characters; "
                f"set data.vocab_size={have}"
            )
        if want is not None and want < have:
            raise ConfigError(
                f"data.vocab_size={want} is smaller than the {have} tokens of the tokenizer "
                f"{self.tokenizer_spec!r}; set data.vocab_size={have} (or larger)"
            )
        if want is None:
            self.vocab_size = have

    def _check_block(self, corpus: str, split: str, n: int) -> None:
        if n < self.block_size + 1:
            raise ConfigError(
                f"data.block_size={self.block_size} is too long for the {split} split of "
                f"{corpus} ({n} tokens; a window needs block_size + 1); set data.block_size "
                f"to at most {max(n - 1, 0)} or use a larger corpus"
            )

    def _val_starts(self, n: int) -> torch.Tensor:
        """Every non-overlapping window (each token predicted once), or `val_windows`
        windows spread evenly over the split. Fixed: the same for every run."""
        last = n - self.block_size - 1  # the last valid start
        if self.val_windows is None:
            return torch.arange(0, last + 1, self.block_size)
        return torch.linspace(0, last, self.val_windows, dtype=torch.float64).round().long()

    def train_epoch_batches(self, world_size: int = 1) -> int:
        """Batches per epoch: configured, or enough to cover the training tokens once."""
        if self.epoch_batches:
            return self.epoch_batches
        tokens = len(self.splits["train"])
        return max(1, tokens // (self.batch_size * world_size * self.block_size))

    def batches(
        self,
        split: str,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        limit_batches: int | None = None,
    ) -> TokenBatches:
        if not self.splits:
            raise RuntimeError("call setup() before batches()")
        if split == "train":
            return TokenBatches(
                self.splits["train"], self.block_size, self.batch_size, self.device,
                self.train_epoch_batches(world_size), seed, rank, world_size,
                limit_batches=limit_batches,
            )  # fmt: skip
        if split == "val" and self.val_size:
            step = self.eval_batch_size * world_size
            return TokenBatches(
                self.splits["val"], self.block_size, self.eval_batch_size, self.device,
                -(-self.val_size // step), seed, rank, world_size, self.val_starts,
                limit_batches,
            )  # fmt: skip
        raise ValueError(f"{type(self).__name__} has no {split!r} split")
