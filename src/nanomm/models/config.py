"""Model configurations: help-annotated dataclasses, and the named presets as plain data.

Three families cover the language models of the notes:
  BertConfig   bidirectional encoder, post-LN, learned positions + segments   (Devlin et al., 2019)
  GPTConfig    causal decoder; GPT-1 post-LN without final norm (Radford et al., 2018), GPT-2/3
               pre-LN with a final LayerNorm (Radford et al., 2019; Brown et al., 2020)
  LlamaConfig  causal decoder with RMSNorm, SwiGLU, RoPE, GQA, no biases        (Touvron et al., 2023)

Every field carries a one-line help in ``field(metadata={"help": ...})`` (``describe(config)``
lists them); fields with a closed set of values carry ``choices`` too. ``from_dict`` rejects unknown
keys and names the valid ones. A preset is a family plus the fields that differ from its defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from nanomm.config import Config, describe, option

__all__ = ["BertConfig", "GPTConfig", "LlamaConfig", "ModelConfig", "PRESETS", "preset", "preset_names", "describe"]

POSITIONS = ("learned", "sinusoidal", "alibi", "rope")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu")
BACKENDS = ("auto", "sdpa", "naive", "flash")


@dataclass
class ModelConfig(Config):
    """Shared behaviour: validation, dict round trip, help text."""

    family: ClassVar[str] = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("vocab_size", "max_positions", "n_layer", "n_head", "dim", "ff_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if self.dim % self.n_head:
            raise ValueError(f"n_head: expected a divisor of dim={self.dim}, got {self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {self.dropout!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head


@dataclass
class BertConfig(ModelConfig):
    """BERT: token + segment + position embeddings, LayerNorm; post-LN encoder; pooler; MLM/NSP heads."""

    family: ClassVar[str] = "bert"
    vocab_size: int = option(30522, "WordPiece vocabulary size")
    max_positions: int = option(512, "rows of the learned position table (longest input)")
    type_vocab_size: int = option(2, "segment (token type) ids: sentence A and B")
    n_layer: int = option(12, "encoder layers")
    n_head: int = option(12, "attention heads")
    dim: int = option(768, "hidden width d")
    ff_dim: int = option(3072, "feed-forward inner width (4d)")
    activation: str = option("gelu", "feed-forward activation (BERT: exact erf GELU)", ACTIVATIONS)
    layer_norm_eps: float = option(1e-12, "LayerNorm epsilon (BERT's TF code: 1e-12)")
    dropout: float = option(0.1, "dropout on embeddings and residual branches")
    init_std: float = option(0.02, "std of the truncated-normal weight init")
    pad_token_id: int = option(0, "id of [PAD]")
    task: str = option("pretraining", "'base': encoder + pooler (BertModel); 'pretraining': + MLM and NSP heads",
                   ("base", "pretraining"))
    pooler: bool = option(True, "tanh(W h[CLS] + b) on top (NSP needs it; some checkpoints drop it)")
    backend: str = option("auto", "attention backend", BACKENDS)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.task == "pretraining" and not self.pooler:
            raise ValueError("pooler: expected True with task='pretraining' (the NSP head reads the pooled [CLS]), "
                             "got False")


@dataclass
class GPTConfig(ModelConfig):
    """GPT: learned (or chosen) positions, a stack of blocks, a head tied to the token embedding."""

    family: ClassVar[str] = "gpt"
    vocab_size: int = option(50257, "BPE vocabulary size")
    max_positions: int = option(1024, "context length (rows of the position table)")
    n_layer: int = option(12, "decoder blocks")
    n_head: int = option(12, "attention heads")
    dim: int = option(768, "hidden width d")
    ff_dim: int = option(3072, "feed-forward inner width (4d)")
    norm_placement: str = option("pre", "'post': GPT-1 (x = LN(x + f(x))); 'pre': GPT-2/3 (x = x + f(LN(x)))",
                             ("pre", "post"))
    final_norm: bool = option(True, "LayerNorm after the last block (GPT-2/3: yes, GPT-1: no)")
    position: str = option("learned", "position encoding", POSITIONS)
    activation: str = option("gelu_tanh", "feed-forward activation (GPT: tanh-approximated GELU)", ACTIVATIONS)
    bias: bool = option(True, "biases in linear layers and LayerNorms")
    layer_norm_eps: float = option(1e-5, "LayerNorm epsilon")
    dropout: float = option(0.1, "dropout on embeddings and residual branches")
    init_std: float = option(0.02, "std of the normal weight init (residual projections scaled by 1/sqrt(2L))")
    tie_embeddings: bool = option(True, "the output head shares the token embedding matrix")
    rope_base: float = option(10000.0, "RoPE base θ (used when position='rope')")
    backend: str = option("auto", "attention backend", BACKENDS)


@dataclass
class LlamaConfig(ModelConfig):
    """LLaMA: pre-norm RMSNorm blocks, SwiGLU, rotary positions, grouped-query attention, no biases."""

    family: ClassVar[str] = "llama"
    vocab_size: int = option(32000, "SentencePiece vocabulary size")
    max_positions: int = option(2048, "context length (RoPE has no table; this sizes its cos/sin cache)")
    n_layer: int = option(32, "decoder blocks")
    n_head: int = option(32, "query heads")
    n_kv_head: int = option(32, "key/value heads; < n_head is grouped-query attention, 1 is multi-query")
    dim: int = option(4096, "hidden width d")
    ff_dim: int = option(11008, "SwiGLU inner width (about 8d/3, rounded)")
    position: str = option("rope", "position encoding (LLaMA: rope)", POSITIONS)
    rms_norm_eps: float = option(1e-6, "RMSNorm epsilon, inside the square root")
    rope_base: float = option(10000.0, "RoPE base θ")
    tie_embeddings: bool = option(False, "share the output head with the token embedding (LLaMA: no)")
    dropout: float = option(0.0, "dropout on residual branches (LLaMA trains without)")
    init_std: float = option(0.02, "std of the normal weight init")
    backend: str = option("auto", "attention backend", BACKENDS)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.n_kv_head, bool) or not isinstance(self.n_kv_head, int) or self.n_kv_head <= 0 \
                or self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head: expected a positive divisor of n_head={self.n_head}, got {self.n_kv_head!r}")


FAMILIES: dict[str, type[ModelConfig]] = {"bert": BertConfig, "gpt": GPTConfig, "llama": LlamaConfig}

# name -> (family, fields that differ from the family's defaults)
_GPT1 = dict(vocab_size=40478, max_positions=512, norm_placement="post", final_norm=False)
_GPT3 = dict(max_positions=2048, n_layer=96, n_head=96, dim=12288, ff_dim=49152)
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "bert-base": ("bert", {}),
    "bert-large": ("bert", dict(n_layer=24, n_head=16, dim=1024, ff_dim=4096)),
    "gpt1": ("gpt", _GPT1),
    "gpt2": ("gpt", {}),
    "gpt2-medium": ("gpt", dict(n_layer=24, n_head=16, dim=1024, ff_dim=4096)),
    "gpt2-large": ("gpt", dict(n_layer=36, n_head=20, dim=1280, ff_dim=5120)),
    "gpt2-xl": ("gpt", dict(n_layer=48, n_head=25, dim=1600, ff_dim=6400)),
    "gpt3-175b": ("gpt", _GPT3),
    "llama-7b": ("llama", {}),
    "llama-13b": ("llama", dict(n_layer=40, n_head=40, n_kv_head=40, dim=5120, ff_dim=13824)),
    # tiny models that train in minutes on two CPU cores; the vocabulary is a placeholder that a
    # tokenizer trained on the corpus replaces (config.replace(vocab_size=...))
    "bert-tiny": ("bert", dict(vocab_size=4096, max_positions=256, n_layer=2, n_head=4, dim=128, ff_dim=512)),
    "gpt-tiny": ("gpt", dict(vocab_size=4096, max_positions=256, n_layer=4, n_head=4, dim=128, ff_dim=512,
                             dropout=0.0)),
    "llama-tiny": ("llama", dict(vocab_size=4096, max_positions=256, n_layer=4, n_head=4, n_kv_head=2,
                                 dim=128, ff_dim=344)),
}


def preset_names() -> list[str]:
    return list(PRESETS)


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The config of a named preset, with optional field overrides."""
    if name not in PRESETS:
        raise ValueError(f"name: unknown preset {name!r}; valid presets are {preset_names()}")
    family, fields = PRESETS[name]
    return FAMILIES[family].from_dict({**fields, **overrides})


