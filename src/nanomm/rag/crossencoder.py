"""A cross-encoder reranker on nanomm's BERT: read query and passage together, score their relevance.

  score(q, p) = w · pooler(BERT([CLS] q [SEP] p [SEP])) + b        (Nogueira & Cho, 2019)

Unlike a bi-encoder, every query token attends to every passage token, so it judges the pair rather
than comparing two summaries — better, and too slow for a whole corpus, hence a second stage over the
first stage's candidates. The weights are a Hugging Face ``BertForSequenceClassification`` folder
(config.json, model.safetensors, tokenizer.json), such as sentence-transformers' ms-marco
cross-encoders; nanomm loads the encoder with ``nanomm.models.from_hf`` and the linear head itself.
No such weights ship offline with nanomm, which is why ``rerank.MaxSimReranker`` is the default.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["CrossEncoder"]


class CrossEncoder:
    """``predict([(query, passage), ...]) -> (N,)`` relevance: the logit, or logit₁ − logit₀ with two labels."""

    def __init__(self, model, weight, bias, tokenizer, max_length: int = 512, batch_size: int = 16):
        self.model, self.weight, self.bias = model.eval(), weight, bias  # (labels, d), (labels,)
        self.tokenizer, self.batch_size = tokenizer, batch_size
        tokenizer.enable_truncation(max_length=min(max_length, model.config.max_positions))
        tokenizer.enable_padding(pad_id=model.config.pad_token_id)

    @classmethod
    def from_dir(cls, path: "str | Path", max_length: int = 512) -> "CrossEncoder":
        from safetensors.torch import save_file
        from tokenizers import Tokenizer

        from nanomm.models import from_hf
        from nanomm.models.hub import read_hf_weights

        folder = Path(path)
        weights = read_hf_weights(folder)
        head = {k.split(".", 1)[1]: weights.pop(k) for k in list(weights) if k.startswith("classifier.")}
        if set(head) != {"weight", "bias"} or head["weight"].shape[0] not in (1, 2):
            raise ValueError(f"path: expected a BertForSequenceClassification folder (classifier.weight and .bias), "
                             f"with 1 or 2 labels, got classifier tensors {({k: tuple(v.shape) for k, v in head.items()})}")
        with tempfile.TemporaryDirectory() as tmp:  # the encoder alone, for nanomm's strict loader
            save_file({k: v.contiguous() for k, v in weights.items()}, str(Path(tmp) / "model.safetensors"))
            (Path(tmp) / "config.json").write_text((folder / "config.json").read_text())
            model = from_hf(tmp)
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        cfg = json.loads((folder / "config.json").read_text())
        return cls(model, head["weight"].float(), head["bias"].float(), tokenizer,
                   max_length=min(max_length, cfg.get("max_position_embeddings", 512)))

    def predict(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        import torch

        if not pairs or not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in pairs):
            raise ValueError("pairs: expected a non-empty list of (query, passage) pairs")
        out = []
        with torch.inference_mode():
            for s in range(0, len(pairs), self.batch_size):
                enc = self.tokenizer.encode_batch([tuple(p) for p in pairs[s:s + self.batch_size]])
                batch = {key: torch.tensor([getattr(e, attr) for e in enc]) for key, attr in
                         (("input_ids", "ids"), ("attention_mask", "attention_mask"), ("token_type_ids", "type_ids"))}
                pooled = self.model(**batch).pooler_output  # (B, d): tanh(W h[CLS] + b)
                logits = pooled @ self.weight.T + self.bias  # (B, labels)
                score = logits[:, 0] if logits.shape[1] == 1 else logits[:, 1] - logits[:, 0]  # log-odds of "relevant"
                out.append(score.float().numpy())
        return np.concatenate(out)
