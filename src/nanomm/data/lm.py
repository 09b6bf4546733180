"""Causal-LM data: documents -> one token stream -> fixed blocks (x, y = x shifted by one) -> batches.

A causal LM learns p(t_i | t_<i); a block of T+1 consecutive tokens gives T predictions at once:

  stream   t0 t1 t2 ... t_T t_{T+1} ...
  x        t0 t1 ...   t_{T-1}            input_ids   (B, T)
  y        t1 t2 ...   t_T                targets     (B, T): the next token at every position

Documents are joined with the end-of-text token between them (GPT-2's convention), so the model also
learns where a text stops. Blocks do not overlap; the target of a block's last position is the first
token of the next block.

The validation split is deterministic: by document (a seeded choice of whole documents, no text shared
with training) or by fraction (the last tokens of the stream, nanoGPT's ``train.bin``/``val.bin`` cut).

``Batcher`` draws batches in a seeded order, epoch after epoch, and its ``state_dict()`` is its
position, so a resumed run draws exactly the batches the interrupted one would have.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from nanomm.data.tokenizer import TextTokenizer

__all__ = ["encode_documents", "train_val_split", "SPLITS", "TokenBlocks", "Batcher", "LMBatches"]


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


def encode_documents(documents: Sequence[str], tokenizer: TextTokenizer, *, separator: bool = True) -> list[np.ndarray]:
    """Token ids of each document (no specials), each followed by the end-of-text id when ``separator``."""
    if not isinstance(tokenizer, TextTokenizer):
        raise TypeError(f"tokenizer: expected a TextTokenizer, got {type(tokenizer).__name__}")
    end = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.sep_id
    if separator and end is None:
        raise ValueError("separator: the tokenizer has no end-of-text ([SEP], </s>, <|endoftext|>) token; "
                         "pass separator=False")
    tail = [end] if separator else []
    dtype = np.int32 if tokenizer.vocab_size < 2**31 else np.int64
    return [np.asarray(ids + tail, dtype=dtype) for ids in tokenizer.encode_many(list(documents))]


def _split_by_document(docs: list[np.ndarray], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    n_val = max(1, math.ceil(len(docs) * val_fraction))
    if n_val >= len(docs):
        raise ValueError(f"val_fraction: {val_fraction} of {len(docs)} documents leaves none for training; "
                         "use by='fraction' or more documents")
    order = np.random.default_rng(seed).permutation(len(docs))
    val = sorted(order[:n_val].tolist())  # keep the corpus order inside each split
    return sorted(order[n_val:].tolist()), val


def _split_by_fraction(stream: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    cut = len(stream) - max(1, math.ceil(len(stream) * val_fraction))
    return stream[:cut], stream[cut:]


def _concat(docs: list[np.ndarray], which: list[int] | None = None) -> np.ndarray:
    parts = docs if which is None else [docs[i] for i in which]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


# how the validation tokens are chosen; each returns (train stream, validation stream)
SPLITS: dict[str, Callable[[list[np.ndarray], float, int], tuple[np.ndarray, np.ndarray]]] = {
    "document": lambda docs, f, seed: tuple(_concat(docs, part) for part in _split_by_document(docs, f, seed)),
    "fraction": lambda docs, f, seed: _split_by_fraction(_concat(docs), f),
}


def train_val_split(docs: Sequence[np.ndarray], *, val_fraction: float = 0.1, by: str = "document",
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two token streams, training and validation, split ``by`` "document" or "fraction"."""
    if by not in SPLITS:
        raise ValueError(f"by: expected one of {list(SPLITS)}, got {by!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction: expected a number in (0, 1), got {val_fraction!r}")
    docs = [np.asarray(d) for d in docs]
    if not docs or not any(len(d) for d in docs):
        raise ValueError("docs: expected at least one non-empty document, got none")
    return SPLITS[by](docs, val_fraction, seed)


class TokenBlocks:
    """Non-overlapping (x, y) blocks of ``block_size`` tokens from one stream; y is x shifted by one."""

    def __init__(self, stream: np.ndarray | Sequence[int], block_size: int):
        self.block_size = _positive_int("block_size", block_size)
        self.stream = torch.as_tensor(np.asarray(stream), dtype=torch.long)
        if self.stream.dim() != 1:
            raise ValueError(f"stream: expected a 1-D sequence of token ids, got shape {tuple(self.stream.shape)}")
        if len(self.stream) < block_size + 1:
            raise ValueError(f"stream: expected at least block_size + 1 = {block_size + 1} tokens, "
                             f"got {len(self.stream)}")

    def __len__(self) -> int:
        return (len(self.stream) - 1) // self.block_size  # the last block needs one more token for its y

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.get(torch.tensor([i]))
        return x[0], y[0]

    def get(self, indices: np.ndarray | torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks at ``indices``: x and y, each (B, T)."""
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        if idx.dim() != 1 or (len(idx) and (idx.min() < 0 or idx.max() >= len(self))):
            raise IndexError(f"indices: expected a 1-D array of ints in [0, {len(self)}), got {idx.tolist()[:8]}")
        starts = idx[:, None] * self.block_size + torch.arange(self.block_size)  # (B, T)
        return self.stream[starts], self.stream[starts + 1]


class Batcher:
    """Batches of indices into ``n`` items: a seeded permutation per epoch, and a resumable position.

    The order of epoch e depends on (seed, e) only, never on earlier draws, so ``load_state_dict``
    needs just (epoch, position). ``batch_seed`` is a seed for the batch just drawn, for any
    randomness inside it (MLM masking) that must also replay on resume.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int = 0, shuffle: bool = True, drop_last: bool = True):
        self.n = _positive_int("n", n)
        self.batch_size = _positive_int("batch_size", batch_size)
        if drop_last and batch_size > n:
            raise ValueError(f"batch_size: expected at most n = {n} items when drop_last=True, got {batch_size}")
        self.seed, self.shuffle, self.drop_last = int(seed), bool(shuffle), bool(drop_last)
        self.epoch, self.position = 0, 0  # the next batch starts at order(epoch)[position]
        self.batch_seed: int | None = None

    def __len__(self) -> int:
        """Batches per epoch."""
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def __next__(self) -> np.ndarray:
        """The next batch of indices; runs forever, one epoch after another."""
        if self.position >= len(self) * self.batch_size:
            self.epoch, self.position = self.epoch + 1, 0
        start = self.position
        indices = self.order(self.epoch)[start:start + self.batch_size]
        self.batch_seed = int(np.random.SeedSequence([self.seed, self.epoch, start]).generate_state(1)[0])
        self.position += self.batch_size
        return indices

    def state_dict(self) -> dict[str, int | bool]:
        return {"n": self.n, "batch_size": self.batch_size, "seed": self.seed, "shuffle": self.shuffle,
                "drop_last": self.drop_last, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved position; the data and batch size must be the ones it was saved with."""
        if not isinstance(state, dict):
            raise TypeError(f"state: expected a dict, got {type(state).__name__}")
        for key in ("n", "batch_size", "seed", "shuffle", "drop_last"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"state: saved with {key}={state[key]!r}, this batcher has {getattr(self, key)!r}")
        missing = {"epoch", "position"} - set(state)
        if missing:
            raise ValueError(f"state: expected keys 'epoch' and 'position', missing {sorted(missing)}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class Batches:
    """An endless, resumable source of batches over a fixed set of items: what the Trainer consumes.

    A subclass sets ``self.batcher`` (a Batcher over its items) and defines ``batch(indices, seed)``;
    ``seed`` is the drawn batch's own seed, for randomness inside it (masking, caption choice) that must
    replay exactly on resume.
    """

    batcher: Batcher

    def batch(self, indices: Sequence[int], seed: int | None = None) -> Any:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        indices = next(self.batcher)
        return self.batch(indices, self.batcher.batch_seed)

    def state_dict(self) -> dict:
        return self.batcher.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batcher.load_state_dict(state)

    def epoch_batches(self) -> Iterator[Any]:
        """Every item once, in order, independent of the training position (for evaluation)."""
        size, n = self.batcher.batch_size, self.batcher.n
        for start in range(0, n, size):
            yield self.batch(np.arange(start, min(start + size, n)), start)


class LMBatches(Batches):
    """Endless causal-LM batches {"input_ids": x, "targets": y}, each (B, T), from a token stream."""

    def __init__(self, stream: np.ndarray | Sequence[int], block_size: int, batch_size: int, *, seed: int = 0,
                 shuffle: bool = True):
        self.blocks = TokenBlocks(stream, block_size)
        self.batcher = Batcher(len(self.blocks), batch_size, seed=seed, shuffle=shuffle,
                               drop_last=len(self.blocks) >= batch_size)

    def batch(self, indices: Sequence[int], seed: int | None = None) -> dict[str, torch.Tensor]:
        x, y = self.blocks.get(indices)
        return {"input_ids": x, "targets": y}

    @property
    def tokens_per_batch(self) -> int:
        return self.batcher.batch_size * self.blocks.block_size
