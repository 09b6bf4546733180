"""A tiny LLaMA twice, with the same base weights: as transformers' LlamaForCausalLM and as nanomm's Llama.

The transformers model is built from a config with random weights (offline), saved with
save_pretrained and read by ``nanomm.models.from_hf``; each test gets fresh deep copies, since the
PEFT methods change a model in place.
"""

from __future__ import annotations

import copy

import pytest
import torch

VOCAB = 99
HF_LLAMA = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64, rope_theta=500.0,
                bos_token_id=0, eos_token_id=0)


@pytest.fixture(scope="session")
def _llama_folder(tmp_path_factory):
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**HF_LLAMA)).eval()
    with torch.no_grad():  # norms start at 1: perturb them so a wrong mapping would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("llama")
    model.save_pretrained(folder)
    from nanomm.models import from_hf

    return folder, model, from_hf(folder).eval()


@pytest.fixture
def llama_pair(_llama_folder):
    """(transformers model, nanomm model, folder): fresh copies with identical weights."""
    folder, hf, ours = _llama_folder
    return copy.deepcopy(hf), copy.deepcopy(ours), folder


@pytest.fixture
def nano_llama(_llama_folder):
    """A fresh nanomm tiny LLaMA (2 layers, d 32, 4 query / 2 kv heads, ff 64, vocab 99)."""
    return copy.deepcopy(_llama_folder[2])


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


TINY = {  # nanomm-only tiny models (no transformers needed): family -> preset overrides
    "llama": ("llama-tiny", dict(vocab_size=VOCAB, n_layer=2, dim=32, n_head=4, n_kv_head=2, ff_dim=64)),
    "gpt": ("gpt-tiny", dict(vocab_size=VOCAB, n_layer=2, dim=32, n_head=4, ff_dim=64, max_positions=64)),
    "bert": ("bert-tiny", dict(vocab_size=VOCAB, n_layer=2, dim=32, n_head=4, ff_dim=64, max_positions=64,
                               dropout=0.0)),
}


def build_tiny(family: str, seed: int = 0):
    from nanomm.models import build, preset

    name, overrides = TINY[family]
    torch.manual_seed(seed)
    return build(preset(name, **overrides)).eval()


@pytest.fixture
def tiny():
    """tiny(family) -> a fresh nanomm model ("llama", "gpt" or "bert"), eval mode."""
    return build_tiny


@pytest.fixture(scope="session")
def _bert_folder(tmp_path_factory):
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                        vocab_size=VOCAB, max_position_embeddings=40, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    model = tf.BertForPreTraining(cfg).eval()
    folder = tmp_path_factory.mktemp("bert")
    model.save_pretrained(folder)
    from nanomm.models import from_hf

    return model, from_hf(folder).eval()


@pytest.fixture
def bert_pair(_bert_folder):
    """(transformers BertForPreTraining, nanomm BertForPreTraining) with the same weights, fresh copies."""
    return tuple(copy.deepcopy(m) for m in _bert_folder)
