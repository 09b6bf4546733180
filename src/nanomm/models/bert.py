"""BERT: a bidirectional transformer encoder pretrained by masked-language modelling (Devlin et al., 2019).

    h_0 = Dropout(LayerNorm(E_tok[x] + E_seg[s] + E_pos[t]))      eps 1e-12, dropout 0.1
    h_l = post-LN block:  x = LN(x + Attn(x));  x = LN(x + FFN(x))
    pooler(h) = tanh(W h_L[CLS] + b)

The notes' embedding stops at the sum; BERT then normalises and drops out (google-research/bert
modeling.py, embedding_postprocessor), and initialises every matrix from a normal truncated at 2σ,
σ = 0.02. Pretraining adds two heads: MLM, a dense + GELU + LayerNorm transform and a decoder whose
weight *is* the token embedding (plus its own bias), and NSP, a 2-way classifier on the pooled [CLS].

Padding: attention_mask (B, T) with 1 = real token; padded keys are masked for every query.
Dropout acts on the embeddings and on each sublayer's output; nanomm's attention has no dropout on
the attention probabilities (BERT's attention_probs_dropout_prob), which only matters in training.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from nanomm.models.config import BertConfig
from nanomm.models.gpt import check_input_ids
from nanomm.models.outputs import BaseModelOutput, PreTrainingOutput
from nanomm.nn.block import Block
from nanomm.nn.mlp import ACTIVATIONS
from nanomm.nn.norm import LayerNorm
from nanomm.nn.position import LearnedPositionalEmbedding

__all__ = ["BertEmbeddings", "BertModel", "BertForPreTraining", "init_bert_weights", "truncated_normal_"]


@torch.no_grad()
def truncated_normal_(w: Tensor, std: float) -> Tensor:
    """N(0, std²) conditioned on |x| ≤ 2·std (TensorFlow's truncated_normal), by redrawing the ~4.6%
    of samples that fall outside; several times faster than inverse-CDF sampling on CPU."""
    w.normal_(0.0, std)
    if w.is_meta:
        return w
    flat = w.view(-1)
    bad = (flat.abs() > 2 * std).nonzero().squeeze(1)  # one pass over w; then only the redrawn ones
    while bad.numel():
        flat[bad] = torch.randn(bad.numel(), dtype=w.dtype, device=w.device) * std
        bad = bad[flat[bad].abs() > 2 * std]
    return w


def init_bert_weights(module: nn.Module, std: float) -> None:
    """BERT's init: matrices ~ N(0, σ²) truncated at ±2σ, biases 0, LayerNorm γ = 1, β = 0."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding, LearnedPositionalEmbedding)):
            truncated_normal_(m.weight, std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


def _check_like(name: str, t: Tensor | None, shape: tuple[int, int]) -> None:
    if t is not None and (not isinstance(t, Tensor) or tuple(t.shape) != shape):
        got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name}: expected shape {shape} like input_ids, got {got}")


class BertEmbeddings(nn.Module):
    """token + segment + position, then LayerNorm and dropout."""

    def __init__(self, c: BertConfig):
        super().__init__()
        self.word = nn.Embedding(c.vocab_size, c.dim)
        self.position = LearnedPositionalEmbedding(c.max_positions, c.dim)
        self.token_type = nn.Embedding(c.type_vocab_size, c.dim)
        self.norm = LayerNorm(c.dim, eps=c.layer_norm_eps)
        self.drop = nn.Dropout(c.dropout)
        self.max_positions = c.max_positions

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None,
                position_ids: Tensor | None = None) -> Tensor:
        B, T = check_input_ids(input_ids)
        if T > self.max_positions:
            raise ValueError(f"input_ids: expected at most max_positions={self.max_positions} tokens, got T={T}")
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device)  # (T,), broadcast over the batch
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)  # every token in sentence A
        x = self.word(input_ids) + self.token_type(token_type_ids) + self.position(position_ids)  # (B, T, d)
        return self.drop(self.norm(x))


class BertModel(nn.Module):
    """Embeddings, a post-LN encoder, and the [CLS] pooler."""

    def __init__(self, config: BertConfig):
        super().__init__()
        if not isinstance(config, BertConfig):
            raise TypeError(f"config: expected a BertConfig, got {type(config).__name__}")
        c = self.config = config
        self.embeddings = BertEmbeddings(c)
        self.layers = nn.ModuleList(
            Block(c.dim, c.n_head, c.ff_dim, norm="layer", ffn=c.activation, placement="post",
                  eps=c.layer_norm_eps, dropout=c.dropout, backend=c.backend)
            for _ in range(c.n_layer))
        self.pooler = nn.Linear(c.dim, c.dim) if c.pooler else None
        init_bert_weights(self, c.init_std)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
                position_ids: Tensor | None = None, output_hidden_states: bool = False) -> BaseModelOutput:
        B, T = check_input_ids(input_ids)
        for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            _check_like(name, t, (B, T))
        keep = None if attention_mask is None else attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        x = self.embeddings(input_ids, token_type_ids, position_ids)
        hidden = [x]
        for layer in self.layers:
            x = layer(x, attn_mask=keep)
            hidden.append(x)
        pooled = torch.tanh(self.pooler(x[:, 0])) if self.pooler is not None else None  # (B, d) from [CLS]
        return BaseModelOutput(last_hidden_state=x, pooler_output=pooled,
                               hidden_states=tuple(hidden) if output_hidden_states else None)


class MLMHead(nn.Module):
    """dense → activation → LayerNorm → decoder (weight tied to the token embedding, own bias)."""

    def __init__(self, c: BertConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = nn.Linear(c.dim, c.dim)
        self.act = ACTIVATIONS[c.activation]
        self.norm = LayerNorm(c.dim, eps=c.layer_norm_eps)
        self.decoder = nn.Linear(c.dim, c.vocab_size)
        self.decoder.weight = word_embeddings.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.norm(self.act(self.transform(x))))  # (B, T, V)


class BertForPreTraining(nn.Module):
    """BertModel with the MLM and NSP heads of pretraining."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.mlm = MLMHead(config, self.bert.embeddings.word)
        self.nsp = nn.Linear(config.dim, 2)
        init_bert_weights(self.nsp, config.init_std)
        init_bert_weights(self.mlm.transform, config.init_std)
        nn.init.zeros_(self.mlm.decoder.bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
                position_ids: Tensor | None = None, output_hidden_states: bool = False) -> PreTrainingOutput:
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states)
        return PreTrainingOutput(prediction_logits=self.mlm(out.last_hidden_state),
                                 seq_relationship_logits=self.nsp(out.pooler_output),
                                 last_hidden_state=out.last_hidden_state, pooler_output=out.pooler_output,
                                 hidden_states=out.hidden_states)
