"""Q-Former: a small BERT whose first tokens are learnable queries that read the image (BLIP-2 §3.1).

    x = LN([Q ; E_word[t] + E_pos])                          Q: (N_q, d) learned, N_q = 32
    per layer l:   x = LN(x + SelfAttn(x, mask))              queries and text share it
                   q = LN(q + CrossAttn(q, image))            queries only, when l % 2 == 0
                   q = LN(q + FFN_query(q));  t = LN(t + FFN_text(t))

The image's 257 ViT tokens are never seen by the language model: the N_q = 32 query outputs summarise
them, and they are what BLIP-2 passes on (Li et al., 2023, "BLIP-2: Bootstrapping Language-Image
Pre-training with Frozen Image Encoders and Large Language Models"). The self-attention mask decides
what each token may read, and so which of the three stage-1 objectives is trained:

    mask               queries see      text sees                    used by
    unimodal           queries          text                          ITC (two separate passes)
    bidirectional      queries + text   queries + text                ITM
    multimodal_causal  queries          queries + earlier text        ITG

(``MASKS``.) Layers are post-LN like BERT; weights load from transformers' Blip2QFormerModel by the
strict table ``HF_RULES``; ``count_qformer_params`` counts the preset analytically.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from nanomm.models.bert import MLMHead, init_bert_weights
from nanomm.models.hub_formats import Rule
from nanomm.models.multimodal_config import QFormerConfig
from nanomm.nn.attention import MultiHeadAttention
from nanomm.nn.mlp import MLP
from nanomm.nn.norm import LayerNorm
from nanomm.nn.position import LearnedPositionalEmbedding

__all__ = ["QFormer", "QFormerLayer", "QFormerOutput", "MASKS", "unimodal_mask", "bidirectional_mask",
           "multimodal_causal_mask", "count_qformer_params", "HF_RULES", "load_hf_qformer"]


# ----------------------------------------------------------------------------- attention masks
# each returns a bool mask (True = may attend) broadcastable to (B, 1, N_q + T, N_q + T)

def _key_padding(n_query: int, text_mask: Tensor) -> Tensor:
    queries = torch.ones(text_mask.shape[0], n_query, dtype=torch.bool, device=text_mask.device)
    return torch.cat([queries, text_mask.bool()], dim=1)  # (B, N_q + T): queries are never padding


def bidirectional_mask(n_query: int, text_mask: Tensor) -> Tensor:
    """Every token sees every real token (ITM: the queries read the text, the text reads the queries)."""
    return _key_padding(n_query, text_mask)[:, None, None, :]  # (B, 1, 1, N_q + T)


def unimodal_mask(n_query: int, text_mask: Tensor) -> Tensor:
    """Queries see queries, text sees text: the two halves of ITC without running two passes."""
    B, T = text_mask.shape
    is_query = torch.arange(n_query + T, device=text_mask.device) < n_query  # (N,)
    same_side = is_query[:, None] == is_query[None, :]  # (N, N)
    return same_side[None, None] & _key_padding(n_query, text_mask)[:, None, None, :]  # (B, 1, N, N)


def multimodal_causal_mask(n_query: int, text_mask: Tensor) -> Tensor:
    """UniLM-style: queries see queries only; text token i sees every query and text tokens ≤ i (ITG)."""
    B, T = text_mask.shape
    n = n_query + T
    i = torch.arange(n, device=text_mask.device)[:, None]
    j = torch.arange(n, device=text_mask.device)[None, :]
    rows_query = i < n_query
    allowed = torch.where(rows_query, j < n_query, (j < n_query) | (j <= i))  # (N, N)
    return allowed[None, None] & _key_padding(n_query, text_mask)[:, None, None, :]  # (B, 1, N, N)


MASKS: dict[str, Callable[[int, Tensor], Tensor]] = {
    "unimodal": unimodal_mask,
    "bidirectional": bidirectional_mask,
    "multimodal_causal": multimodal_causal_mask,
}


# ----------------------------------------------------------------------------- the layers

class QFormerEmbeddings(nn.Module):
    """[queries ; word + position] then LayerNorm and dropout (LAVIS's BertEmbeddings with query_embeds)."""

    def __init__(self, c: QFormerConfig):
        super().__init__()
        self.word = nn.Embedding(c.vocab_size, c.dim)
        self.position = LearnedPositionalEmbedding(c.max_positions, c.dim)
        self.norm = LayerNorm(c.dim, eps=c.layer_norm_eps)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, queries: Tensor | None, input_ids: Tensor | None) -> Tensor:
        parts = [] if queries is None else [queries]
        if input_ids is not None:
            T = input_ids.shape[1]
            parts.append(self.word(input_ids) + self.position(torch.arange(T, device=input_ids.device)))
        return self.drop(self.norm(torch.cat(parts, dim=1)))  # (B, N_q + T, d)


class QFormerLayer(nn.Module):
    """Shared self-attention; cross-attention and FFN_query for the first n_query rows, FFN_text for the rest."""

    def __init__(self, c: QFormerConfig, cross: bool):
        super().__init__()
        d, eps = c.dim, c.layer_norm_eps
        self.attn = MultiHeadAttention(d, c.n_head, backend=c.backend)
        self.norm_attn = LayerNorm(d, eps=eps)
        self.cross = cross
        if cross:
            self.cross_attn = MultiHeadAttention(d, c.n_head, kv_dim=c.cross_dim, backend=c.backend)
            self.norm_cross = LayerNorm(d, eps=eps)
        self.mlp_query = MLP(d, c.ff_dim, activation=c.activation)
        self.norm_query = LayerNorm(d, eps=eps)
        if c.text_ffn:
            self.mlp_text = MLP(d, c.ff_dim, activation=c.activation)
            self.norm_text = LayerNorm(d, eps=eps)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x: Tensor, n_query: int, attn_mask: Tensor | None, image: Tensor | None,
                image_mask: Tensor | None) -> Tensor:
        x = self.norm_attn(x + self.drop(self.attn(x, attn_mask=attn_mask)))  # post-LN, as BERT
        q, t = x[:, :n_query], x[:, n_query:]  # (B, N_q, d), (B, T, d)
        if n_query:
            if self.cross:
                q = self.norm_cross(q + self.drop(self.cross_attn(q, context=image, attn_mask=image_mask)))
            q = self.norm_query(q + self.drop(self.mlp_query(q)))
        if t.shape[1]:
            if not hasattr(self, "mlp_text"):
                raise ValueError("input_ids: this Q-Former was built with text_ffn=False and cannot read text")
            t = self.norm_text(t + self.drop(self.mlp_text(t)))
        return torch.cat([q, t], dim=1)


@dataclass
class QFormerOutput:
    """(B, N_q + T, d) states, split into the query rows and the text rows."""

    last_hidden_state: Tensor
    query_output: Tensor | None
    text_output: Tensor | None


class QFormer(nn.Module):
    """Learnable queries + text through QFormerLayers; an optional LM head over the text rows (ITG)."""

    def __init__(self, config: QFormerConfig):
        super().__init__()
        if not isinstance(config, QFormerConfig):
            raise TypeError(f"config: expected a QFormerConfig, got {type(config).__name__}")
        c = self.config = config
        self.query_tokens = nn.Parameter(torch.empty(1, c.n_query, c.dim))
        self.embeddings = QFormerEmbeddings(c)
        self.layers = nn.ModuleList(QFormerLayer(c, c.has_cross(i)) for i in range(c.n_layer))
        init_bert_weights(self, c.init_std)
        nn.init.normal_(self.query_tokens, std=c.init_std)  # LAVIS: normal, not truncated
        self.lm_head = MLMHead(c, self.embeddings.word) if c.lm_head else None
        if self.lm_head is not None:
            init_bert_weights(self.lm_head.transform, c.init_std)
            nn.init.zeros_(self.lm_head.decoder.bias)

    def _check(self, image_embeds: Tensor | None, input_ids: Tensor | None, attention_mask: Tensor | None) -> None:
        c = self.config
        if image_embeds is None and input_ids is None:
            raise ValueError("image_embeds, input_ids: expected at least one of them, got neither")
        if image_embeds is not None and (not isinstance(image_embeds, Tensor) or image_embeds.dim() != 3
                                         or image_embeds.shape[-1] != c.cross_dim):
            got = tuple(image_embeds.shape) if isinstance(image_embeds, Tensor) else type(image_embeds).__name__
            raise ValueError(f"image_embeds: expected (B, N, cross_dim={c.cross_dim}), got {got}")
        if input_ids is not None:
            if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
                got = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
                raise ValueError(f"input_ids: expected integer ids (B, T), got {got}")
            if input_ids.shape[1] > c.max_positions:
                raise ValueError(f"input_ids: expected at most max_positions={c.max_positions} tokens, "
                                 f"got T={input_ids.shape[1]}")
            if image_embeds is not None and image_embeds.shape[0] != input_ids.shape[0]:
                raise ValueError(f"input_ids: expected batch {image_embeds.shape[0]} like image_embeds, "
                                 f"got {tuple(input_ids.shape)}")
            if attention_mask is not None and (not isinstance(attention_mask, Tensor)
                                               or attention_mask.shape != input_ids.shape):
                got = (tuple(attention_mask.shape) if isinstance(attention_mask, Tensor)
                       else type(attention_mask).__name__)
                raise ValueError(f"attention_mask: expected {tuple(input_ids.shape)} like input_ids, got {got}")

    def forward(self, image_embeds: Tensor | None = None, input_ids: Tensor | None = None,
                attention_mask: Tensor | None = None, *, mask: str = "bidirectional",
                image_mask: Tensor | None = None) -> QFormerOutput:
        """Queries (when ``image_embeds`` (B, N, cross_dim) is given) and text ``input_ids`` (B, T) together.

        ``attention_mask`` (B, T): 1 for real text tokens; ``mask``: a key of MASKS; ``image_mask``
        (B, N): 1 for image tokens the queries may read (default: all).
        """
        if mask not in MASKS:
            raise ValueError(f"mask: expected one of {sorted(MASKS)}, got {mask!r}")
        self._check(image_embeds, input_ids, attention_mask)
        with_image = image_embeds is not None
        B = image_embeds.shape[0] if with_image else input_ids.shape[0]
        n_query = self.config.n_query if with_image else 0
        queries = self.query_tokens.expand(B, -1, -1) if with_image else None  # (B, N_q, d)
        x = self.embeddings(queries, input_ids)  # (B, N_q + T, d)
        T = x.shape[1] - n_query
        text_mask = attention_mask if attention_mask is not None else torch.ones(B, T, dtype=torch.long,
                                                                                 device=x.device)
        attn_mask = MASKS[mask](n_query, text_mask) if T else None
        keep_image = None if image_mask is None else image_mask.bool()[:, None, None, :]  # (B, 1, 1, N)
        for layer in self.layers:
            x = layer(x, n_query, attn_mask, image_embeds, keep_image)
        return QFormerOutput(last_hidden_state=x, query_output=x[:, :n_query] if n_query else None,
                             text_output=x[:, n_query:] if T else None)

    def lm_logits(self, text_output: Tensor) -> Tensor:
        """(B, T, d) text rows -> (B, T, V) next-token logits (ITG)."""
        if self.lm_head is None:
            raise ValueError("text_output: this Q-Former was built with lm_head=False")
        return self.lm_head(text_output)


# ----------------------------------------------------------------------------- size

def count_qformer_params(c: QFormerConfig) -> dict[str, int]:
    """Parameters of QFormer(c) by part, from the config alone (the paper's "188M" is the total)."""
    d, f, V, L = c.dim, c.ff_dim, c.vocab_size, c.n_layer
    linear = (lambda i, o: i * o + o)
    ln = 2 * d
    n_cross = sum(c.has_cross(i) for i in range(L))
    ffn = linear(d, f) + linear(f, d) + ln
    parts = {
        "queries": c.n_query * d,
        "embeddings": V * d + c.max_positions * d + ln,
        "self_attention": L * (4 * linear(d, d) + ln),
        "cross_attention": n_cross * (2 * linear(d, d) + 2 * linear(c.cross_dim, d) + ln),
        "query_ffn": L * ffn,
        "text_ffn": L * ffn if c.text_ffn else 0,
        # dense + LayerNorm + the decoder's bias; its weight is the word embedding
        "lm_head": linear(d, d) + ln + V if c.lm_head else 0,
    }
    parts["total"] = sum(parts.values())
    return parts


# ----------------------------------------------------------------------------- transformers' names

def _wb(hf: str, ours: str) -> list[Rule]:
    return [Rule(f"{hf}.{p}", (f"{ours}.{p}",)) for p in ("weight", "bias")]


_HF_ATTENTION = {"attention.query": "q_proj", "attention.key": "k_proj", "attention.value": "v_proj",
                 "output.dense": "o_proj"}
HF_RULES: list[Rule] = [
    *_wb("layernorm", "embeddings.norm"),
    *[r for hf, ours in _HF_ATTENTION.items() for r in _wb(f"encoder.layer.{{i}}.attention.{hf}",
                                                              f"layers.{{i}}.attn.{ours}")],
    *_wb("encoder.layer.{i}.attention.output.LayerNorm", "layers.{i}.norm_attn"),
    *[r for hf, ours in _HF_ATTENTION.items() for r in _wb(f"encoder.layer.{{i}}.crossattention.{hf}",
                                                              f"layers.{{i}}.cross_attn.{ours}")],
    *_wb("encoder.layer.{i}.crossattention.output.LayerNorm", "layers.{i}.norm_cross"),
    *_wb("encoder.layer.{i}.intermediate_query.dense", "layers.{i}.mlp_query.fc_in"),
    *_wb("encoder.layer.{i}.output_query.dense", "layers.{i}.mlp_query.fc_out"),
    *_wb("encoder.layer.{i}.output_query.LayerNorm", "layers.{i}.norm_query"),
    *_wb("encoder.layer.{i}.intermediate.dense", "layers.{i}.mlp_text.fc_in"),
    *_wb("encoder.layer.{i}.output.dense", "layers.{i}.mlp_text.fc_out"),
    *_wb("encoder.layer.{i}.output.LayerNorm", "layers.{i}.norm_text"),
]
"""Blip2QFormerModel's tensors -> QFormer's. HF keeps the queries, the word and position embeddings
outside the Q-Former (Blip2Model.query_tokens, Blip2TextEmbeddings): ``load_hf_qformer`` takes them
from ``extra``."""


def load_hf_qformer(model: QFormer, tensors: dict[str, Tensor], *, extra: dict[str, Tensor] | None = None) -> None:
    """Copy a Blip2QFormerModel state dict (names without the ``qformer.`` prefix) into ``model``, strictly:
    every HF tensor must have a place and every weight of ``model`` must be filled, apart from those
    that ``extra`` (nanomm names -> tensors) provides or that HF's Q-Former lacks by design (the
    queries, text embeddings and LM head) when ``extra`` does not give them."""
    ours = dict(model.named_parameters())
    rules = [(r, r.pattern()) for r in HF_RULES]
    filled: dict[str, Tensor] = {}
    unused = []
    for name, value in tensors.items():
        match = next(((r, m) for r, p in rules if (m := p.match(name))), None)
        target = match[0].ours[0].format(i=match[1].groupdict().get("i")) if match else None
        if target is None or target not in ours:
            unused.append(name)
            continue
        filled[target] = value
    filled.update(extra or {})
    outside_hf = ("query_tokens", "embeddings.word.", "embeddings.position.", "lm_head.")
    missing = [n for n in ours if n not in filled and not n.startswith(outside_hf)]
    bad = [f"{n}: checkpoint {tuple(v.shape)} vs model {tuple(ours[n].shape)}" for n, v in filled.items()
           if n in ours and tuple(v.shape) != tuple(ours[n].shape)]
    unknown = sorted(set(filled) - set(ours))
    if unused or missing or bad or unknown:
        raise ValueError(f"tensors: a Blip2QFormerModel state dict that does not fit this QFormer: "
                         f"no place for {sorted(unused)}; missing {missing}; shape mismatches {bad}; "
                         f"unknown extra names {unknown}")
    with torch.no_grad():
        for name, value in filled.items():
            ours[name].copy_(value)
