"""What the models return: small dataclasses with the field names transformers uses.

Code written against transformers' outputs (``out.logits``, ``out.last_hidden_state`` …) reads
nanomm's the same way. ``hidden_states``, when asked for, is a tuple of the embedding output and
the output of every layer, (B, T, d) each.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from nanomm.nn.attention import KVCache

__all__ = ["BaseModelOutput", "PreTrainingOutput", "CausalLMOutput"]


@dataclass
class BaseModelOutput:
    """Encoder output: (B, T, d) states, the (B, d) pooled [CLS] vector."""

    last_hidden_state: Tensor
    pooler_output: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None


@dataclass
class PreTrainingOutput:
    """BERT pretraining heads: (B, T, V) MLM logits and (B, 2) next-sentence logits."""

    prediction_logits: Tensor
    seq_relationship_logits: Tensor
    last_hidden_state: Tensor | None = None
    pooler_output: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None


@dataclass
class CausalLMOutput:
    """Decoder output: (B, T, V) next-token logits and the cache to continue from."""

    logits: Tensor
    past_key_values: KVCache | None = None
    last_hidden_state: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None
