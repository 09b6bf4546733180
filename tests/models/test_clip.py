"""CLIP: equality with transformers' CLIPModel both ways, the loss and temperature, zero-shot, retrieval."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from nanomm.models.clip import (CLIP, clip_from_hf, clip_to_hf, retrieval_recall, zero_shot_probs,
                                zero_shot_weights)
from nanomm.models.vision_config import CLIPConfig, vision_preset
from nanomm.nn.losses import clip_loss

tf = pytest.importorskip("transformers")

# float32, two or three layers of width 32: observed differences ~2e-7 on unit-norm embeddings
ATOL = 1e-5
VOCAB, EOS = 99, 98


def hf_clip(eos: int, seed: int = 0):
    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=20, eos_token_id=eos, pad_token_id=0, bos_token_id=1)
    vision = dict(image_size=30, patch_size=6, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                  num_attention_heads=4)
    torch.manual_seed(seed)
    model = tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    with torch.no_grad():  # LayerNorms start at 1/0: perturb them so a swapped norm would show
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
        model.logit_scale.fill_(math.log(20.0))
    return model


@pytest.fixture(scope="module", params=[EOS, 2], ids=["eos-pooling", "legacy-argmax-pooling"])
def loaded(request, tmp_path_factory):
    """(transformers model, nanomm model loaded from its save_pretrained folder, folder)."""
    hf = hf_clip(request.param)
    folder = tmp_path_factory.mktemp("clip")
    hf.save_pretrained(folder)
    return hf, clip_from_hf(folder), folder


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    px = torch.randn(3, 3, 30, 30, generator=g)
    ids = torch.randint(3, 90, (3, 9), generator=g)  # ids < EOS, so EOS is also each row's largest id
    lengths = torch.tensor([9, 6, 4])
    for b, n in enumerate(lengths):
        ids[b, n - 1] = EOS
        ids[b, n:] = 0  # right padding
    mask = (torch.arange(9)[None] < lengths[:, None]).long()
    return px, ids, mask


def test_loads_with_equal_embeddings(loaded):
    hf, ours, _ = loaded
    px, ids, mask = batch()
    with torch.no_grad():
        want = hf(input_ids=ids, pixel_values=px, attention_mask=mask)
        got = ours(px, ids, mask)
    torch.testing.assert_close(got.image_embeds, want.image_embeds, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.text_embeds, want.text_embeds, atol=ATOL, rtol=0)
    # logits too: the scale e^t = 20 is below the clamp, so nanomm's min(e^t, 100) equals it
    torch.testing.assert_close(got.logits_per_image, want.logits_per_image, atol=20 * ATOL, rtol=0)


def test_pooling_follows_the_config(loaded):
    _, ours, _ = loaded
    assert ours.config.text.pooling == ("argmax" if ours.config.text.eos_token_id == 2 else "eos")


def test_export_round_trip(loaded, tmp_path):
    hf, ours, _ = loaded
    clip_to_hf(ours, tmp_path, extra={"nanomm": {"note": 1}})
    back = tf.CLIPModel.from_pretrained(tmp_path).eval()
    px, ids, mask = batch(3)
    with torch.no_grad():
        want = hf(input_ids=ids, pixel_values=px, attention_mask=mask)
        got = back(input_ids=ids, pixel_values=px, attention_mask=mask)
    torch.testing.assert_close(got.image_embeds, want.image_embeds, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.text_embeds, want.text_embeds, atol=ATOL, rtol=0)
    assert json.loads((tmp_path / "config.json").read_text())["nanomm"] == {"note": 1}


def test_strict_loading_names_the_stray_tensor(loaded, tmp_path):
    from safetensors.torch import load_file, save_file

    _, _, folder = loaded
    tensors = load_file(folder / "model.safetensors")
    tensors["text_model.extra.weight"] = torch.zeros(2)
    del tensors["visual_projection.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(ValueError, match=r"(?s)no place for.*text_model\.extra\.weight.*missing.*visual_projection"):
        clip_from_hf(tmp_path)


def test_temperature_init_and_clamp():
    model = CLIP(vision_preset("clip-tiny"))
    assert float(model.logit_scale.detach()) == pytest.approx(math.log(1 / 0.07))  # τ = 0.07
    assert float(model.scale.detach()) == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(500.0))
    assert float(model.scale.detach()) == 100.0  # clipped at 100, CLIP §2.5


def test_loss_is_symmetric_infonce_on_cosines():
    torch.manual_seed(0)
    model = CLIP(vision_preset("clip-tiny", text={"vocab_size": 40, "max_positions": 8})).eval()
    px = torch.randn(4, 3, 48, 48)
    ids = torch.randint(4, 40, (4, 8))
    ids[:, -1] = 3  # eos
    out = model(px, ids)
    logits = out.logits_per_image
    target = torch.arange(4)
    want = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    img, txt = model.encode_image(px, normalize=False), model.encode_text(ids, normalize=False)
    torch.testing.assert_close(clip_loss(img, txt, model.logit_scale), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(4))  # L2-normalised


@settings(max_examples=20, deadline=None)
@given(st.integers(2, 12), st.integers(0, 10_000))
def test_retrieval_recall_properties(n, seed):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n, 8, generator=g, dtype=torch.float64)
    perfect = retrieval_recall(img, img * 3.0, ks=(1, n))  # a rescaled copy: cosine ranks itself first
    assert perfect["i2t_R@1"] == perfect["t2i_R@1"] == 1.0
    txt = torch.randn(n, 8, generator=g, dtype=torch.float64)
    r = retrieval_recall(img, txt, ks=(1, 2, n))
    assert 0.0 <= r["i2t_R@1"] <= r["i2t_R@2"] <= r["i2t_R@" + str(n)] == 1.0
    # one shared label makes every item a hit
    same = torch.zeros(n, dtype=torch.long)
    assert retrieval_recall(img, txt, ks=(1,), image_labels=same, text_labels=same)["t2i_R@1"] == 1.0


def test_retrieval_recall_by_hand():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    txt = torch.tensor([[1.0, 0.3], [0.2, 1.0], [1.0, 0.1]])
    # image → text cosines: image 0 ranks texts 2, 0, 1 (own second); image 1 its own first;
    # image 2 ranks texts 0, 1, 2 (own last)
    r = retrieval_recall(img, txt, ks=(1, 2, 3))
    assert (r["i2t_R@1"], r["i2t_R@2"], r["i2t_R@3"]) == pytest.approx((1 / 3, 2 / 3, 1.0))
    # text → image: texts 0 and 1 rank their own image first, text 2 ranks images 0, 2, 1 (own second)
    assert (r["t2i_R@1"], r["t2i_R@2"]) == pytest.approx((2 / 3, 1.0))


class _Words:
    """A toy tokenizer: one id per word, EOS = 3 appended, right padding with 0."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def encode_batch(self, texts):
        rows = [[4 + self.vocab.setdefault(w, len(self.vocab)) % 30 for w in t.split()] + [3] for t in texts]
        width = max(map(len, rows))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        lengths = torch.tensor([len(r) for r in rows])
        return {"input_ids": ids, "attention_mask": (torch.arange(width)[None] < lengths[:, None]).long()}


def test_zero_shot_weights_average_templates():
    torch.manual_seed(0)
    model = CLIP(vision_preset("clip-tiny", text={"vocab_size": 40, "max_positions": 8})).eval()
    tok = _Words()
    w = zero_shot_weights(model, tok, ["cat", "dog"], ["a {}", "the {}"])
    enc = tok.encode_batch(["a cat", "the cat"])
    mean = model.encode_text(enc["input_ids"], enc["attention_mask"]).mean(0)
    torch.testing.assert_close(w[0], mean / mean.norm(), atol=1e-6, rtol=0)
    probs = zero_shot_probs(model, torch.randn(5, 3, 48, 48), w)
    assert probs.shape == (5, 2)
    torch.testing.assert_close(probs.sum(-1), torch.ones(5))
    with pytest.raises(ValueError, match="templates"):
        zero_shot_weights(model, tok, ["cat"], ["no placeholder"])
    with pytest.raises(ValueError, match="classnames"):
        zero_shot_weights(model, tok, [], ["a {}"])


def test_config_round_trip_and_validation():
    c = vision_preset("clip-vit-l-14")
    assert CLIPConfig.from_dict(c.to_dict()) == c
    assert c.vision.n_tokens == 257 and c.projection_dim == 768
    with pytest.raises(ValueError, match="unknown keys"):
        CLIPConfig.from_dict({"vision": {}, "txt": {}})
    with pytest.raises(ValueError, match="eos_token_id"):
        vision_preset("clip-tiny", text={"eos_token_id": 500})


def test_text_requires_eos():
    model = CLIP(vision_preset("clip-tiny", text={"vocab_size": 40, "max_positions": 8}))
    with pytest.raises(ValueError, match="eos_token_id=3"):
        model.encode_text(torch.full((2, 5), 7))
