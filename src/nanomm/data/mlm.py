"""BERT's pretraining data: masked-LM targets and next-sentence pairs, as google-research/bert makes them.

Masked LM (Devlin et al., 2019, §3.1 and appendix A.1; create_pretraining_data.py):
  k = min(max_predictions, max(1, round(0.15 · n)))   n = tokens in the sequence, [CLS]/[SEP] included
  choose k positions uniformly among the non-special ones ([CLS], [SEP], [PAD] are never chosen);
  each chosen position: 80% -> [MASK], 10% -> a uniformly random vocabulary id, 10% -> unchanged;
  labels = the original id at chosen positions, -100 (ignored by cross-entropy) everywhere else.
The count is exact per sequence, not a coin flip per token: Hugging Face's
DataCollatorForLanguageModeling instead selects each non-special token with probability 0.15
independently, with no cap, so its count varies from sequence to sequence. Whole-word masking (the
2019 update of the reference) chooses whole words, in random order, skipping a word that would
overflow k; every piece of a chosen word then draws its own 80/10/10.

Next-sentence prediction: [CLS] A [SEP] B [SEP], segment ids 0 for "[CLS] A [SEP]" and 1 for "B [SEP]".
A is a run of sentences of one document; with probability 1/2 B is the run that follows it
(IsNext, label 0 as in transformers' BertForPreTraining), otherwise a run from another document
(NotNext, label 1). As in the reference, a chunk of a single sentence has no continuation to offer
and always gets a random B, so on real text slightly more than half of the pairs are NotNext.
The pair is cut to the length budget by removing tokens from the longer side, front or back at random.

The reference masks once when it writes the dataset; here masking happens per batch (RoBERTa's
"dynamic masking", Liu et al., 2019), with the same distribution, seeded by the batch's position.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from nanomm.data.corpus import split_sentences
from nanomm.data.lm import Batcher, Batches
from nanomm.data.tokenizer import TextTokenizer

__all__ = ["MaskedLM", "mask_tokens", "n_predictions", "wordpiece_word_ids", "NSPPair", "make_nsp_pairs",
           "sentence_ids", "collate_pairs", "MaskingConfig", "MLMBatches", "IGNORE_INDEX"]

IGNORE_INDEX = -100  # torch's cross_entropy default ignore_index


class MaskedLM(NamedTuple):
    input_ids: Tensor  # (B, T) with [MASK], random and kept tokens at the chosen positions
    labels: Tensor  # (B, T) original ids at chosen positions, IGNORE_INDEX elsewhere


def _check_prob(name: str, p: float) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"{name}: expected a probability in [0, 1], got {p!r}")


def _check_ids(input_ids: Tensor) -> None:
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"input_ids: expected a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"input_ids: expected (B, T) int64 ids, got {tuple(input_ids.shape)} {input_ids.dtype}")


def _check_like(name: str, t: Tensor | None, ids: Tensor) -> None:
    if t is not None and (not isinstance(t, Tensor) or t.shape != ids.shape):
        shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name}: expected shape {tuple(ids.shape)} like input_ids, got {shape}")


def n_predictions(lengths: Tensor, mlm_prob: float = 0.15, max_predictions: int | None = 20) -> Tensor:
    """min(max_predictions, max(1, round(mlm_prob · n))) per sequence, rounding half to even like Python 3."""
    k = torch.round(lengths.to(torch.float64) * mlm_prob).clamp(min=1).to(torch.long)  # float64 as Python's round
    return k if max_predictions is None else k.clamp(max=max_predictions)


def _choose_tokens(candidates: Tensor, k: Tensor, gen: torch.Generator) -> Tensor:
    """k uniformly random candidate positions per row (all of them where a row has fewer)."""
    scores = torch.rand(candidates.shape, generator=gen, dtype=torch.float64)
    scores[~candidates] = float("inf")  # non-candidates sort last
    rank = scores.argsort(dim=1).argsort(dim=1)  # (B, T) rank of each position in a random order
    return (rank < k[:, None]) & candidates


def _choose_words(candidates: Tensor, k: Tensor, word_ids: Tensor, gen: torch.Generator) -> Tensor:
    """Whole words in random order, skipping a word that would take the row past k (the reference's rule)."""
    chosen = torch.zeros_like(candidates)
    for b in range(candidates.shape[0]):
        words = torch.unique(word_ids[b][candidates[b]])
        count = 0
        for w in words[torch.randperm(len(words), generator=gen)]:
            if count >= k[b]:
                break
            where = candidates[b] & (word_ids[b] == w)
            size = int(where.sum())
            if count + size > k[b]:
                continue
            chosen[b] |= where
            count += size
    return chosen


def mask_tokens(input_ids: Tensor, *, special_mask: Tensor, vocab_size: int, mask_id: int,
                attention_mask: Tensor | None = None, mlm_prob: float = 0.15, max_predictions: int | None = 20,
                mask_prob: float = 0.8, random_prob: float = 0.1, word_ids: Tensor | None = None,
                generator: torch.Generator | None = None) -> MaskedLM:
    """Masked-LM inputs and labels for a batch, by create_pretraining_data.py's rule (module docstring).

    special_mask (B, T) bool: positions never chosen. attention_mask (B, T): 1 on real tokens (padding is
    neither counted in n nor chosen). word_ids (B, T): the word of each token, for whole-word masking.
    """
    _check_ids(input_ids)
    for name, t in (("special_mask", special_mask), ("attention_mask", attention_mask), ("word_ids", word_ids)):
        _check_like(name, t, input_ids)
    for name, p in (("mlm_prob", mlm_prob), ("mask_prob", mask_prob), ("random_prob", random_prob)):
        _check_prob(name, p)
    if mask_prob + random_prob > 1.0:
        raise ValueError(f"mask_prob + random_prob: expected at most 1, got {mask_prob} + {random_prob}")
    if max_predictions is not None and (isinstance(max_predictions, bool) or not isinstance(max_predictions, int)
                                        or max_predictions <= 0):
        raise ValueError(f"max_predictions: expected a positive int or None, got {max_predictions!r}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ValueError(f"vocab_size: expected a positive int, got {vocab_size!r}")
    if not 0 <= mask_id < vocab_size:
        raise ValueError(f"mask_id: expected an id in [0, {vocab_size}), got {mask_id!r}")
    gen = generator if generator is not None else torch.Generator().manual_seed(int(torch.randint(2**62, ())))
    device, ids = input_ids.device, input_ids.cpu().long()  # draws on the CPU: one stream whatever the device
    real = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.cpu().bool()
    candidates = real & ~special_mask.cpu().bool()
    k = n_predictions(real.sum(1), mlm_prob, max_predictions)
    if word_ids is None:
        chosen = _choose_tokens(candidates, k, gen)
    else:
        chosen = _choose_words(candidates, k, word_ids.cpu(), gen)
    u = torch.rand(ids.shape, generator=gen, dtype=torch.float64)
    to_mask = chosen & (u < mask_prob)
    to_random = chosen & (u >= mask_prob) & (u < mask_prob + random_prob)
    out = ids.clone()
    out[to_mask] = mask_id
    # any vocabulary id, specials included, as the reference (vocab_words) and transformers both do
    out[to_random] = torch.randint(vocab_size, ids.shape, generator=gen)[to_random]
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
    return MaskedLM(out.to(device, input_ids.dtype), labels.to(device))


def wordpiece_word_ids(input_ids: Tensor, tokenizer: TextTokenizer) -> Tensor:
    """Word index of each token ("##" pieces join the word before them); -1 on special tokens."""
    _check_ids(input_ids)
    special = tokenizer.special_tokens_mask(input_ids)
    cont = torch.isin(input_ids, tokenizer.continuation_ids.to(input_ids.dtype)) & ~special
    after_special = torch.cat([torch.ones_like(special[:, :1]), special[:, :-1]], dim=1)
    starts = ~special & (~cont | after_special)
    word = starts.long().cumsum(1) - 1
    return word.masked_fill(special, -1)


@dataclass(frozen=True)
class NSPPair:
    """One next-sentence example: [CLS] A [SEP] B [SEP] and its segment ids."""

    input_ids: tuple[int, ...]
    token_type_ids: tuple[int, ...]
    is_random_next: bool
    forced: bool = False  # B is random because A's chunk had one sentence and so no continuation

    @property
    def label(self) -> int:
        return int(self.is_random_next)  # BertForPreTraining: 0 = B follows A, 1 = B is random


def _truncate_pair(a: list[int], b: list[int], max_tokens: int, rng: random.Random) -> None:
    """Drop tokens from the longer side (A on a tie), from its front or back at random, until both fit."""
    while len(a) + len(b) > max_tokens:
        longer = a if len(a) >= len(b) else b
        if rng.random() < 0.5:
            del longer[0]
        else:
            longer.pop()


def _random_segments(docs: list[list[list[int]]], skip: int, need: int, rng: random.Random) -> list[int]:
    """Tokens from a random document other than ``skip``, from a random sentence on, until ``need``."""
    other = rng.randrange(len(docs) - 1)
    other += other >= skip
    doc = docs[other]
    out: list[int] = []
    for segment in doc[rng.randrange(len(doc)):]:
        out.extend(segment)
        if len(out) >= need:
            break
    return out


def _pairs_from_document(docs: list[list[list[int]]], d: int, cls_id: int, sep_id: int, max_seq_length: int,
                         short_seq_prob: float, next_prob: float, rng: random.Random) -> list[NSPPair]:
    doc, max_tokens = docs[d], max_seq_length - 3  # room for [CLS] [SEP] [SEP]
    # now and then a shorter target, to look like the short inputs of fine-tuning
    target = rng.randint(2, max_tokens) if rng.random() < short_seq_prob else max_tokens
    pairs, chunk, length, i = [], [], 0, 0
    while i < len(doc):
        chunk.append(doc[i])
        length += len(doc[i])
        if i == len(doc) - 1 or length >= target:
            a_end = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
            a = [t for seg in chunk[:a_end] for t in seg]
            forced = len(chunk) == 1
            if forced or rng.random() >= next_prob:  # no continuation, or the coin says random
                b, is_random = _random_segments(docs, d, target - len(a), rng), True
                i -= len(chunk) - a_end  # the unused sentences start the next chunk
            else:
                b, is_random = [t for seg in chunk[a_end:] for t in seg], False
            _truncate_pair(a, b, max_tokens, rng)
            ids = (cls_id, *a, sep_id, *b, sep_id)
            types = (0,) * (len(a) + 2) + (1,) * (len(b) + 1)
            pairs.append(NSPPair(ids, types, is_random, forced))
            chunk, length = [], 0
        i += 1
    return pairs


def make_nsp_pairs(documents: Sequence[Sequence[Sequence[int]]], *, cls_id: int, sep_id: int,
                   max_seq_length: int = 128, short_seq_prob: float = 0.1, next_prob: float = 0.5,
                   seed: int = 0) -> list[NSPPair]:
    """NSP pairs from documents given as lists of tokenised sentences (``sentence_ids``), in document order."""
    if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int) or max_seq_length < 5:
        raise ValueError(f"max_seq_length: expected an int >= 5 ([CLS] A [SEP] B [SEP]), got {max_seq_length!r}")
    _check_prob("short_seq_prob", short_seq_prob)
    _check_prob("next_prob", next_prob)
    docs = [[list(s) for s in doc if len(s)] for doc in documents]
    docs = [doc for doc in docs if doc]
    if len(docs) < 2:
        raise ValueError(f"documents: expected at least 2 non-empty documents (a random B comes from another "
                         f"document), got {len(docs)}")
    rng = random.Random(seed)
    return [p for d in range(len(docs))
            for p in _pairs_from_document(docs, d, cls_id, sep_id, max_seq_length, short_seq_prob, next_prob, rng)]


def sentence_ids(documents: Sequence[str], tokenizer: TextTokenizer) -> list[list[list[int]]]:
    """Each document as a list of tokenised sentences (no specials), the input of ``make_nsp_pairs``."""
    out = []
    for doc in documents:
        sentences = split_sentences(doc)
        out.append([ids for ids in tokenizer.encode_many(sentences) if ids] if sentences else [])
    return out


def collate_pairs(pairs: Sequence[NSPPair], pad_id: int) -> dict[str, Tensor]:
    """Right-padded (B, T) input_ids, token_type_ids, attention_mask, and next_sentence_label (B,)."""
    if not pairs:
        raise ValueError("pairs: expected at least one NSPPair, got none")
    width = max(len(p.input_ids) for p in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    types = torch.zeros((len(pairs), width), dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for r, p in enumerate(pairs):
        n = len(p.input_ids)
        ids[r, :n], types[r, :n], mask[r, :n] = torch.tensor(p.input_ids), torch.tensor(p.token_type_ids), 1
    label = torch.tensor([p.label for p in pairs], dtype=torch.long)
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask, "next_sentence_label": label}


@dataclass(frozen=True)
class MaskingConfig:
    """The masked-LM knobs, with BERT's values."""

    mlm_prob: float = 0.15  # share of each sequence's tokens to predict
    max_predictions: int | None = 20  # cap per sequence (BERT: 20 at length 128, 80 at 512)
    mask_prob: float = 0.8  # of the chosen: replaced by [MASK]
    random_prob: float = 0.1  # of the chosen: replaced by a random id (the rest stay unchanged)
    whole_word: bool = False  # choose whole words (WordPiece "##" pieces stay with their word)


class MLMBatches(Batches):
    """Endless MLM+NSP batches: collated pairs, masked per batch with a seed from the batch's position."""

    def __init__(self, pairs: Sequence[NSPPair], tokenizer: TextTokenizer, batch_size: int, *, seed: int = 0,
                 masking: MaskingConfig = MaskingConfig(), shuffle: bool = True):
        missing = [r for r in ("pad", "mask", "cls", "sep") if getattr(tokenizer, f"{r}_id") is None]
        if missing:
            raise ValueError(f"tokenizer: expected BERT's special tokens, missing {missing} in {tokenizer!r}")
        self.pairs, self.tokenizer, self.masking = list(pairs), tokenizer, masking
        self.batcher = Batcher(len(self.pairs), batch_size, seed=seed, shuffle=shuffle,
                               drop_last=len(self.pairs) >= batch_size)

    def batch(self, indices: Sequence[int], seed: int | None = 0) -> dict[str, Tensor]:
        """The pairs at ``indices``, collated and masked with ``seed``; adds ``labels``."""
        out = collate_pairs([self.pairs[i] for i in indices], self.tokenizer.pad_id)
        ids, m = out["input_ids"], self.masking
        words = wordpiece_word_ids(ids, self.tokenizer) if m.whole_word else None
        masked = mask_tokens(ids, special_mask=self.tokenizer.special_tokens_mask(ids),
                             attention_mask=out["attention_mask"], vocab_size=self.tokenizer.vocab_size,
                             mask_id=self.tokenizer.mask_id, mlm_prob=m.mlm_prob, max_predictions=m.max_predictions,
                             mask_prob=m.mask_prob, random_prob=m.random_prob, word_ids=words,
                             generator=torch.Generator().manual_seed(seed))
        return {**out, "input_ids": masked.input_ids, "labels": masked.labels}

