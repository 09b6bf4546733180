"""Prefix tuning: learned keys and values in front of every layer's attention (Li & Liang, 2021).

    head_h = softmax(q [P_k; K]ᵀ / √D) [P_v; V]        P_k, P_v (P, D) learned per layer and kv head

The base model stays frozen; only the L·2·P·n_kv·D prefix numbers train. Li & Liang found training
them directly unstable and reparameterise through an MLP, P = W₂ tanh(W₁ E + b₁) + b₂ with a
smaller table E (their §4.3); the MLP is dropped after training, only its output is kept.

How it reaches the model. A decoder already accepts past keys and values: the KV cache. The prefix
is written into a fresh ``KVCache`` as positions 0…P−1 of every layer before the first forward, and
the attention mask gains P leading ones, so each query sees the prefix and the causal structure of
the real tokens is unchanged (causal masking is bottom-right aligned). Generation then continues
from that cache as usual: the prefix sits in front of everything cached. This needs no change to
the model code: a forward pre-hook on the model does it. The caller's coordinates exclude the prefix:
a mask that covers only the real tokens gets the P ones prepended, explicit position_ids are moved
by P, so real tokens sit at positions P, P+1, … with or without them (as in peft with transformers).
The prefix keys are not rotated by RoPE: they are stored in the cache as they are, like peft's.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn

from nanomm.nn.attention import KVCache
from nanomm.peft.config import PrefixConfig
from nanomm.peft.hf_names import HfNames

__all__ = ["PrefixEncoder", "PrefixTuning", "inject", "remove", "find", "to_peft", "from_peft", "ATTRIBUTE"]

ATTRIBUTE = "peft_prefix"  # the name of the PrefixTuning submodule on the model


class PrefixEncoder(nn.Module):
    """The prefix table, optionally through Li & Liang's MLP; peft's parameter names and layout.

    forward() -> (2L, n_kv, P, D): keys of layer l at 2l, values at 2l + 1.
    """

    def __init__(self, n_tokens: int, n_layer: int, n_kv: int, head_dim: int, *, projection: bool = False,
                 hidden: int | None = None, device=None, dtype=None):
        super().__init__()
        self.shape = (n_tokens, 2 * n_layer, n_kv, head_dim)
        kv = n_kv * head_dim
        kw = dict(device=device, dtype=dtype)
        if projection:
            self.embedding = nn.Embedding(n_tokens, kv, **kw)
            self.transform = nn.Sequential(nn.Linear(kv, hidden or kv, **kw), nn.Tanh(),
                                           nn.Linear(hidden or kv, 2 * n_layer * kv, **kw))
        else:
            self.embedding = nn.Embedding(n_tokens, 2 * n_layer * kv, **kw)  # N(0, 1) as peft's default

    def flat(self) -> Tensor:
        table = self.embedding.weight  # (P, kv) or (P, 2L·kv)
        return self.transform(table) if hasattr(self, "transform") else table  # (P, 2L·kv)

    def forward(self) -> Tensor:
        return self.flat().view(self.shape).permute(1, 2, 0, 3)  # (2L, n_kv, P, D)


class PrefixTuning(nn.Module):
    """Holds the prefix and, as the model's forward pre-hook, feeds it in through the KV cache."""

    def __init__(self, encoder: PrefixEncoder, n_layer: int, signature: inspect.Signature):
        super().__init__()
        self.encoder = encoder
        self.n_layer = n_layer
        self.n_tokens = encoder.shape[0]
        self.enabled = True
        self._signature = signature

    def prefill(self, cache: KVCache, batch_size: int) -> None:
        """Write the prefix into an empty cache as positions 0 … P−1 of every layer."""
        kv = self.encoder()  # (2L, n_kv, P, D)
        for layer in range(self.n_layer):
            k, v = (kv[2 * layer + i].unsqueeze(0).expand(batch_size, -1, -1, -1) for i in (0, 1))
            cache.update(layer, k, v)  # (B, n_kv, P, D)
        cache.prefix_length = self.n_tokens

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not self.enabled:
            return None
        bound = self._signature.bind(*args, **kwargs)
        kw = dict(bound.arguments)
        tokens = kw.get("input_ids")
        tokens = kw.get("inputs_embeds") if tokens is None else tokens  # (B, T) ids or (B, T, d) embeddings
        B, T = tokens.shape[:2]
        P = self.n_tokens
        cache = kw.get("past_key_values")
        cache = KVCache() if cache is None else cache
        if not isinstance(cache, KVCache):
            raise TypeError(f"past_key_values: expected a nanomm KVCache, got {type(cache).__name__}")
        if cache.length == 0:
            self.prefill(cache, B)
        elif getattr(cache, "prefix_length", None) != P:
            raise ValueError("past_key_values: this cache was filled without the prefix (adapters disabled, or "
                             "another model); start from an empty cache")
        kw["past_key_values"] = cache
        past = cache.length - P  # positions the caller knows of
        mask = kw.get("attention_mask")
        if mask is not None:
            if mask.shape[-1] == past + T:
                kw["attention_mask"] = torch.cat([mask.new_ones(B, P), mask], dim=1)  # (B, P + past + T)
            elif mask.shape[-1] != past + P + T:
                raise ValueError(f"attention_mask: expected (B, T_past + T) = ({B}, {past + T}) without the "
                                 f"{P} prefix positions, or ({B}, {P + past + T}) with them, got {tuple(mask.shape)}")
        if kw.get("position_ids") is not None:
            kw["position_ids"] = kw["position_ids"] + P
        return (), kw


def find(model: nn.Module) -> PrefixTuning | None:
    found = getattr(model, ATTRIBUTE, None)
    return found if isinstance(found, PrefixTuning) else None


def inject(model: nn.Module, config: PrefixConfig) -> list[str]:
    """Add a PrefixTuning submodule to a decoder and hook it in front of the model's forward."""
    signature = inspect.signature(model.forward)
    if "past_key_values" not in signature.parameters or not hasattr(model, "blocks"):
        raise TypeError(f"model: prefix tuning needs a decoder whose forward takes past_key_values (a KVCache) "
                        f"and has blocks; {type(model).__name__} does not (an encoder needs its attention to "
                        "accept extra keys/values)")
    if find(model) is not None:
        raise ValueError("model: already has a prefix; unload() it before applying again")
    c = model.config
    n_kv = getattr(c, "n_kv_head", c.n_head)
    p = next(model.parameters())
    encoder = PrefixEncoder(config.num_virtual_tokens, len(model.blocks), n_kv, c.dim // c.n_head,
                            projection=config.projection, hidden=config.projection_hidden,
                            device=p.device, dtype=p.dtype)
    prefix = PrefixTuning(encoder, len(model.blocks), signature)
    model.add_module(ATTRIBUTE, prefix)
    # a bound method: copy.deepcopy(model) rebinds it to the copy's own PrefixTuning
    model.register_forward_pre_hook(prefix.pre_forward, with_kwargs=True)
    return [ATTRIBUTE]


def remove(model: nn.Module) -> None:
    """Take the prefix and its hook off the model."""
    prefix = find(model)
    if prefix is None:
        return
    # the hook is found by what it is bound to (a stored handle would point into the original after a deepcopy)
    for key, hook in list(model._forward_pre_hooks.items()):
        if getattr(hook, "__self__", None) is prefix:
            del model._forward_pre_hooks[key]
            model._forward_pre_hooks_with_kwargs.pop(key, None)
    delattr(model, ATTRIBUTE)


# ----------------------------------------------------------------------------- peft's file layout

def to_peft(model: nn.Module, config: PrefixConfig, layers: dict, names: HfNames
            ) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """peft saves the prefix itself (the MLP's output), (P, 2L·n_kv·D), as "prompt_embeddings"."""
    prefix = find(model)
    _, two_l, n_kv, d = prefix.encoder.shape
    cfg = {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": prefix.n_tokens,
           "token_dim": n_kv * d, "num_layers": two_l // 2, "num_attention_heads": n_kv,
           "num_transformer_submodules": 1, "encoder_hidden_size": config.projection_hidden or n_kv * d,
           "prefix_projection": config.projection, "inference_mode": True, "base_model_name_or_path": None}
    with torch.no_grad():
        flat = prefix.encoder.flat()
    return cfg, {"prompt_embeddings": flat}


def from_peft(model: nn.Module, cfg: dict[str, Any], tensors: dict[str, Tensor], names: HfNames
              ) -> tuple[PrefixConfig, dict[str, Tensor]]:
    """A prefix file becomes a plain table (no MLP): what was trained is its output."""
    c = model.config
    n_kv, d, n_layer = getattr(c, "n_kv_head", c.n_head), c.dim // c.n_head, c.n_layer
    expect = {"token_dim": n_kv * d, "num_layers": n_layer, "num_attention_heads": n_kv,
              "num_transformer_submodules": 1}
    wrong = {k: cfg.get(k) for k, v in expect.items() if cfg.get(k, v) != v}
    if wrong:
        raise ValueError(f"adapter_config.json: expected {expect} for this {type(model).__name__}, got {wrong}")
    if set(tensors) != {"prompt_embeddings"}:
        raise ValueError(f"adapter_model.safetensors: expected one tensor 'prompt_embeddings', got {sorted(tensors)}")
    config = PrefixConfig(num_virtual_tokens=int(cfg["num_virtual_tokens"]), projection=False)
    return config, {f"{ATTRIBUTE}.encoder.embedding.weight": tensors["prompt_embeddings"]}
