"""Tiny configs and tiny random transformers models saved to disk, shared by the model tests.

The reference models come from transformers' own classes with random weights (offline), saved with
save_pretrained, so every test loads a real Hugging Face folder.
"""

from __future__ import annotations

import pytest
import torch

tf = pytest.importorskip("transformers")

VOCAB = 99

# name -> (transformers model class, its config class, config kwargs)
HF_TINY = {
    "bert": ("BertForPreTraining", "BertConfig",
             dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                  vocab_size=VOCAB, max_position_embeddings=40)),
    "bert-base-model": ("BertModel", "BertConfig",
                        dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                             vocab_size=VOCAB, max_position_embeddings=40)),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config",
             dict(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=40, bos_token_id=0,
                  eos_token_id=0)),
    "gpt1": ("OpenAIGPTLMHeadModel", "OpenAIGPTConfig",
             dict(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=40)),
    "llama": ("LlamaForCausalLM", "LlamaConfig",  # grouped-query attention: 4 query heads, 2 kv heads
              dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64, rope_theta=500.0,
                   bos_token_id=0, eos_token_id=0)),
}


def make_hf_model(name: str, seed: int = 0):
    model_cls, config_cls, kwargs = HF_TINY[name]
    torch.manual_seed(seed)
    model = getattr(tf, model_cls)(getattr(tf, config_cls)(**kwargs)).eval()
    with torch.no_grad():  # LayerNorm/RMSNorm start at 1/0: perturb them so a swapped norm would show
        for n, p in model.named_parameters():
            if "norm" in n.lower() or "ln_" in n:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="session")
def hf_tiny(tmp_path_factory):
    """hf_tiny(name) -> (folder, transformers model) saved once per session."""
    cache = {}

    def get(name: str):
        if name not in cache:
            model = make_hf_model(name)
            folder = tmp_path_factory.mktemp(name)
            model.save_pretrained(folder)
            cache[name] = (folder, model)
        return cache[name]

    return get


def padded_batch(B: int = 3, T: int = 9, *, side: str = "right", seed: int = 1):
    """Random ids with a mask whose rows have different lengths; row 0 is unpadded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(1, B):
        n_pad = (2 * b) % T
        if side == "right":
            mask[b, T - n_pad:] = 0
        else:
            mask[b, :n_pad] = 0
    return ids, mask


@pytest.fixture(scope="session")
def make_batch():
    """make_batch(B, T, side=...) -> (ids, mask); a fixture so tests need not import conftest."""
    return padded_batch
