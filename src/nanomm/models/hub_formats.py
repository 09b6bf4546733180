"""The Hugging Face formats nanomm reads and writes: weight-name rules and config translations.

A rule pairs one HF tensor name pattern with one or more nanomm names, ``{i}`` standing for the layer
index, and converts the layout where the two differ:
  GPT-1/GPT-2  Conv1D layers store weight (in, out): transposed; the fused q/k/v ``c_attn`` is split
  BERT         the MLM decoder's weight and bias are tied copies in HF: read if present, never written
  LLaMA        HF checkpoints already use the half-split RoPE pairing of nanomm: copied as they are
Names are written without the base-model prefix (``bert.``, ``transformer.``, ``model.``); the
loader strips it and the writer adds it back. A config translation refuses HF options nanomm does
not implement (relative positions, scaled RoPE, attention biases in LLaMA ...) instead of ignoring them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from nanomm.models.config import BertConfig, GPTConfig, LlamaConfig, ModelConfig

__all__ = ["Rule", "Family", "FAMILIES", "BERT_RULES", "GPT2_RULES", "GPT1_RULES", "LLAMA_RULES"]

Tensors = tuple[Tensor, ...]


def _same(*t: Tensor) -> Tensors:
    return t


@dataclass(frozen=True)
class Rule:
    """One HF tensor <-> one or more nanomm tensors; ``load``/``save`` convert between the layouts."""

    hf: str
    ours: tuple[str, ...]
    load: Callable[..., Tensors] = _same  # hf tensor -> our tensors
    save: Callable[..., Tensor] | None = None  # our tensors -> hf tensor (None: the tensor as it is)
    write: bool = True  # False for a tied copy that HF re-creates on load

    def pattern(self) -> re.Pattern:
        return re.compile(re.escape(self.hf).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


def _wb(hf: str, ours: str, **kw: Any) -> list[Rule]:
    """weight and bias of one layer."""
    return [Rule(f"{hf}.{p}", (f"{ours}.{p}",), **kw) for p in ("weight", "bias")]


def _t(w: Tensor) -> Tensors:
    return (w.t(),)


# GPT-2's Conv1D: weight (in, out); c_attn holds q, k, v side by side along "out"
_conv = dict(load=_t, save=lambda w: w.t())
_qkv_w = dict(load=lambda w: tuple(w.t().chunk(3, dim=0)), save=lambda q, k, v: torch.cat([q, k, v], 0).t())
_qkv_b = dict(load=lambda b: tuple(b.chunk(3, dim=0)), save=lambda q, k, v: torch.cat([q, k, v], 0))
_QKV = ("blocks.{i}.attn.q_proj", "blocks.{i}.attn.k_proj", "blocks.{i}.attn.v_proj")

_BERT_LAYER = {
    "attention.self.query": "attn.q_proj", "attention.self.key": "attn.k_proj",
    "attention.self.value": "attn.v_proj", "attention.output.dense": "attn.o_proj",
    "attention.output.LayerNorm": "norm1", "intermediate.dense": "mlp.fc_in",
    "output.dense": "mlp.fc_out", "output.LayerNorm": "norm2",
}
BERT_RULES = [
    Rule("embeddings.word_embeddings.weight", ("embeddings.word.weight",)),
    Rule("embeddings.position_embeddings.weight", ("embeddings.position.weight",)),
    Rule("embeddings.token_type_embeddings.weight", ("embeddings.token_type.weight",)),
    *_wb("embeddings.LayerNorm", "embeddings.norm"),
    *[r for hf, ours in _BERT_LAYER.items() for r in _wb(f"encoder.layer.{{i}}.{hf}", f"layers.{{i}}.{ours}")],
    *_wb("pooler.dense", "pooler"),
    *_wb("cls.predictions.transform.dense", "mlm.transform"),
    *_wb("cls.predictions.transform.LayerNorm", "mlm.norm"),
    Rule("cls.predictions.bias", ("mlm.decoder.bias",)),
    Rule("cls.predictions.decoder.bias", ("mlm.decoder.bias",), write=False),  # HF ties it to the above
    Rule("cls.predictions.decoder.weight", ("mlm.decoder.weight",), write=False),  # tied to word_embeddings
    *_wb("cls.seq_relationship", "nsp"),
]

GPT2_RULES = [
    Rule("wte.weight", ("embed_tokens.weight",)),
    Rule("wpe.weight", ("positions.wpe.weight",)),
    *_wb("h.{i}.ln_1", "blocks.{i}.norm1"),
    Rule("h.{i}.attn.c_attn.weight", tuple(f"{n}.weight" for n in _QKV), **_qkv_w),
    Rule("h.{i}.attn.c_attn.bias", tuple(f"{n}.bias" for n in _QKV), **_qkv_b),
    Rule("h.{i}.attn.c_proj.weight", ("blocks.{i}.attn.o_proj.weight",), **_conv),
    Rule("h.{i}.attn.c_proj.bias", ("blocks.{i}.attn.o_proj.bias",)),
    *_wb("h.{i}.ln_2", "blocks.{i}.norm2"),
    Rule("h.{i}.mlp.c_fc.weight", ("blocks.{i}.mlp.fc_in.weight",), **_conv),
    Rule("h.{i}.mlp.c_fc.bias", ("blocks.{i}.mlp.fc_in.bias",)),
    Rule("h.{i}.mlp.c_proj.weight", ("blocks.{i}.mlp.fc_out.weight",), **_conv),
    Rule("h.{i}.mlp.c_proj.bias", ("blocks.{i}.mlp.fc_out.bias",)),
    *_wb("ln_f", "norm"),
    Rule("lm_head.weight", ("lm_head.weight",)),
]

_GPT1_NAMES = {"wte.weight": "tokens_embed.weight", "wpe.weight": "positions_embed.weight"}
GPT1_RULES = [Rule(_GPT1_NAMES.get(r.hf, r.hf), r.ours, r.load, r.save, r.write)
              for r in GPT2_RULES if not r.hf.startswith("ln_f.")]

LLAMA_RULES = [
    Rule("embed_tokens.weight", ("embed_tokens.weight",)),
    *[Rule(f"layers.{{i}}.self_attn.{p}.weight", (f"blocks.{{i}}.attn.{p}.weight",))
      for p in ("q_proj", "k_proj", "v_proj", "o_proj")],
    *[Rule(f"layers.{{i}}.mlp.{p}.weight", (f"blocks.{{i}}.mlp.{p}.weight",))
      for p in ("gate_proj", "up_proj", "down_proj")],
    Rule("layers.{i}.input_layernorm.weight", ("blocks.{i}.norm1.weight",)),
    Rule("layers.{i}.post_attention_layernorm.weight", ("blocks.{i}.norm2.weight",)),
    Rule("norm.weight", ("norm.weight",)),
    Rule("lm_head.weight", ("lm_head.weight",)),
]


# ----------------------------------------------------------------------------- configs

_ACT_IN = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
_ACT_OUT = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}


def _require(cfg: dict, key: str, allowed: tuple, default: Any) -> None:
    value = cfg.get(key, default)
    if value not in allowed:
        raise ValueError(f"config.json: {key}={value!r} is not supported by nanomm (expected one of {list(allowed)})")


_GPT1_ACT_IN = {"gelu": "gelu_tanh", "relu": "relu"}  # openai-gpt's "gelu" is the tanh approximation


def _act(cfg: dict, key: str, default: str, table: dict[str, str] = _ACT_IN) -> str:
    value = cfg.get(key, default)
    if value not in table:
        raise ValueError(f"config.json: {key}={value!r} is not supported (expected one of {sorted(table)})")
    return table[value]


def _check_layout(name: str, c: ModelConfig, layout: dict[str, Any]) -> None:
    wrong = {k: getattr(c, k) for k, v in layout.items() if getattr(c, k) != v}
    if wrong:
        raise ValueError(f"model: the {name} format needs {layout}; this model has {wrong}")


def _bert_in(cfg: dict, names: set[str]) -> BertConfig:
    heads = any(n.startswith("cls.") for n in names)
    pooler = heads or any(n.startswith("pooler.") for n in names)  # BertModel(add_pooling_layer=False) has none
    _require(cfg, "position_embedding_type", ("absolute", None), "absolute")
    for key in ("is_decoder", "add_cross_attention"):
        _require(cfg, key, (False,), False)
    return BertConfig(
        vocab_size=cfg["vocab_size"], max_positions=cfg["max_position_embeddings"],
        type_vocab_size=cfg.get("type_vocab_size", 2), n_layer=cfg["num_hidden_layers"],
        n_head=cfg["num_attention_heads"], dim=cfg["hidden_size"], ff_dim=cfg["intermediate_size"],
        activation=_act(cfg, "hidden_act", "gelu"), layer_norm_eps=cfg.get("layer_norm_eps", 1e-12),
        dropout=cfg.get("hidden_dropout_prob", 0.1), init_std=cfg.get("initializer_range", 0.02),
        pad_token_id=cfg.get("pad_token_id") or 0, task="pretraining" if heads else "base", pooler=pooler)


def _bert_out(c: BertConfig) -> dict:
    return dict(vocab_size=c.vocab_size, max_position_embeddings=c.max_positions, type_vocab_size=c.type_vocab_size,
                num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, hidden_size=c.dim,
                intermediate_size=c.ff_dim, hidden_act=_ACT_OUT[c.activation], layer_norm_eps=c.layer_norm_eps,
                hidden_dropout_prob=c.dropout, attention_probs_dropout_prob=c.dropout,
                initializer_range=c.init_std, pad_token_id=c.pad_token_id, position_embedding_type="absolute")


def _gpt2_in(cfg: dict, names: set[str]) -> GPTConfig:
    _require(cfg, "scale_attn_weights", (True,), True)
    _require(cfg, "scale_attn_by_inverse_layer_idx", (False,), False)
    _require(cfg, "add_cross_attention", (False,), False)
    dim = cfg["n_embd"]
    return GPTConfig(
        vocab_size=cfg["vocab_size"], max_positions=cfg["n_positions"], n_layer=cfg["n_layer"], n_head=cfg["n_head"],
        dim=dim, ff_dim=cfg.get("n_inner") or 4 * dim, activation=_act(cfg, "activation_function", "gelu_new"),
        layer_norm_eps=cfg.get("layer_norm_epsilon", 1e-5), dropout=cfg.get("resid_pdrop", 0.1),
        init_std=cfg.get("initializer_range", 0.02), tie_embeddings=cfg.get("tie_word_embeddings", True))


def _gpt2_out(c: GPTConfig) -> dict:
    _check_layout("GPT-2", c, dict(norm_placement="pre", final_norm=True, position="learned", bias=True))
    return dict(vocab_size=c.vocab_size, n_positions=c.max_positions, n_layer=c.n_layer, n_head=c.n_head,
                n_embd=c.dim, n_inner=c.ff_dim, activation_function=_ACT_OUT[c.activation],
                layer_norm_epsilon=c.layer_norm_eps, resid_pdrop=c.dropout, embd_pdrop=c.dropout,
                attn_pdrop=0.0, initializer_range=c.init_std, tie_word_embeddings=c.tie_embeddings)


def _gpt1_in(cfg: dict, names: set[str]) -> GPTConfig:
    dim = cfg["n_embd"]
    return GPTConfig(
        vocab_size=cfg["vocab_size"], max_positions=cfg["n_positions"], n_layer=cfg["n_layer"], n_head=cfg["n_head"],
        dim=dim, ff_dim=4 * dim, norm_placement="post", final_norm=False,
        activation=_act(cfg, "afn", "gelu", _GPT1_ACT_IN), layer_norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
        dropout=cfg.get("resid_pdrop", 0.1), init_std=cfg.get("initializer_range", 0.02), tie_embeddings=True)


def _gpt1_out(c: GPTConfig) -> dict:
    layout = dict(norm_placement="post", final_norm=False, position="learned", bias=True, ff_dim=4 * c.dim,
                  tie_embeddings=True, activation="gelu_tanh")
    _check_layout("GPT-1 (openai-gpt)", c, layout)
    return dict(vocab_size=c.vocab_size, n_positions=c.max_positions, n_layer=c.n_layer, n_head=c.n_head,
                n_embd=c.dim, afn="gelu", layer_norm_epsilon=c.layer_norm_eps, resid_pdrop=c.dropout,
                embd_pdrop=c.dropout, attn_pdrop=0.0, initializer_range=c.init_std)


def llama_config_in(cfg: dict, names: set[str]) -> LlamaConfig:
    _require(cfg, "hidden_act", ("silu",), "silu")
    for key in ("attention_bias", "mlp_bias"):
        _require(cfg, key, (False,), False)
    _require(cfg, "pretraining_tp", (1,), 1)
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    _require(rope, "rope_type", ("default",), rope.get("type", "default"))
    n_head, dim = cfg["num_attention_heads"], cfg["hidden_size"]
    _require(cfg, "head_dim", (None, dim // n_head), None)
    return LlamaConfig(
        vocab_size=cfg["vocab_size"], max_positions=cfg.get("max_position_embeddings", 2048),
        n_layer=cfg["num_hidden_layers"], n_head=n_head, n_kv_head=cfg.get("num_key_value_heads") or n_head,
        dim=dim, ff_dim=cfg["intermediate_size"], rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_base=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        tie_embeddings=cfg.get("tie_word_embeddings", False), init_std=cfg.get("initializer_range", 0.02))


def _llama_out(c: LlamaConfig) -> dict:
    _check_layout("LLaMA", c, dict(position="rope"))
    return dict(vocab_size=c.vocab_size, max_position_embeddings=c.max_positions, num_hidden_layers=c.n_layer,
                num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head, hidden_size=c.dim,
                intermediate_size=c.ff_dim, hidden_act="silu", rms_norm_eps=c.rms_norm_eps,
                rope_theta=c.rope_base, rope_parameters={"rope_type": "default", "rope_theta": c.rope_base},
                attention_bias=False, mlp_bias=False, tie_word_embeddings=c.tie_embeddings,
                initializer_range=c.init_std, head_dim=c.head_dim)


@dataclass(frozen=True)
class Family:
    model_type: str
    base_prefix: str  # what HF puts in front of the base model's weights inside *For... models
    head_prefixes: tuple[str, ...]  # HF names outside the base model
    rules: list[Rule]
    config_in: Callable[[dict, set[str]], ModelConfig]  # config.json and the (normalised) tensor names
    config_out: Callable[[Any], dict]
    ignore: tuple[str, ...] = ()  # regexes of HF buffers that are not weights
    legacy: dict[str, str] = field(default_factory=dict)  # old name piece -> current


FAMILIES: dict[str, Family] = {
    "bert": Family("bert", "bert.", ("cls.",), BERT_RULES, _bert_in, _bert_out,
                   ignore=(r"embeddings\.position_ids$",),
                   legacy={"LayerNorm.gamma": "LayerNorm.weight", "LayerNorm.beta": "LayerNorm.bias"}),
    "gpt2": Family("gpt2", "transformer.", ("lm_head.",), GPT2_RULES, _gpt2_in, _gpt2_out,
                   ignore=(r"h\.\d+\.attn\.(bias|masked_bias)$",)),
    "openai-gpt": Family("openai-gpt", "transformer.", ("lm_head.",), GPT1_RULES, _gpt1_in, _gpt1_out,
                         ignore=(r"h\.\d+\.attn\.bias$", r"position_ids$")),
    "llama": Family("llama", "model.", ("lm_head.",), LLAMA_RULES, llama_config_in, _llama_out,
                    ignore=(r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq$",)),
}
