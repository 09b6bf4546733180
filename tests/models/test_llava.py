"""LLaVA: logits equal to transformers' LlavaForConditionalGeneration, splicing, projectors, stages, generate."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlavaConfig as HFLlavaConfig
from transformers import LlavaForConditionalGeneration

from nanomm.models.generation import generate
from nanomm.models.llava import (IGNORE_INDEX, PROJECTORS, STAGES, Llava, decode_embeds, llava_from_hf, set_stage,
                                 splice_images)
from nanomm.models.multimodal_config import LlavaConfig, multimodal_preset

IMG, N = 59, 4  # image token id; 16 px images in 8 px patches: 4 patch tokens


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A random tiny HF LLaVA (CLIP ViT + LLaMA with GQA), saved, reloaded, and loaded into nanomm."""
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          image_size=16, patch_size=8)
    tc = HFLlamaConfig(vocab_size=60, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    hf = LlavaForConditionalGeneration(HFLlavaConfig(vision_config=vc, text_config=tc, image_token_index=IMG,
                                                     image_seq_length=N))
    with torch.no_grad():  # larger than the init's 0.02 so that every weight moves the logits
        for p in hf.parameters():
            p.normal_(0, 0.15) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    folder = tmp_path_factory.mktemp("llava")
    hf.save_pretrained(folder)
    hf = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    return hf, llava_from_hf(folder)


def _expand(ids: torch.Tensor) -> torch.Tensor:
    """The processor's form: each <image> written N times."""
    rows = []
    for r in ids.tolist():
        k = r.index(IMG)
        rows.append(r[:k] + [IMG] * N + r[k + 1:])
    return torch.tensor(rows)


# float32, same weights: rounding only (a few ulp of O(1) logits); 1e-5 still catches any real difference
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("expanded", [False, True])
def test_logits_equal_transformers(pair, padded, expanded):
    hf, ours = pair
    ids = torch.tensor([[1, 5, IMG, 7, 8, 9], [2, IMG, 4, 4, 6, 3]])
    mask = torch.ones(2, 6, dtype=torch.long)
    if padded:  # left padding, as batched generation has it
        ids[0] = torch.tensor([0, 0, 1, IMG, 7, 8])
        mask[0, :2] = 0
    full_mask = torch.cat([mask, torch.ones(2, N - 1, dtype=torch.long)], 1)  # the pads stay first
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    full = _expand(ids)
    with torch.no_grad():
        # transformers counts positions from the first column, pads included; nanomm from the first real token
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
        want = hf(input_ids=full, pixel_values=pixels, attention_mask=full_mask, position_ids=positions).logits
        got = ours(input_ids=full if expanded else ids, pixel_values=pixels,
                   attention_mask=full_mask if expanded else mask).logits
    keep = full_mask.bool()  # padded positions are undefined in both
    assert got.shape == want.shape
    torch.testing.assert_close(got[keep], want[keep], atol=1e-5, rtol=0)
    assert want.abs().max() > 1.0  # the comparison is not between near-zero numbers


def test_config_from_hf(pair):
    _, ours = pair
    c = ours.config
    assert (c.projector, c.vision_feature_layer, c.feature_select, c.image_token_id) == ("mlp2x_gelu", -2, "patch", IMG)
    assert (c.lm.n_kv_head, c.vision.n_patches) == (2, N)


# ----------------------------------------------------------------------------- splicing

def test_splice_one_placeholder_grows_by_n_minus_1():
    ids = torch.tensor([[1, IMG, 5, 6], [IMG, 4, 4, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    labels = torch.tensor([[-100, -100, 5, 6], [-100, -100, 4, -100]])
    text = torch.randn(2, 4, 8)
    feats = torch.randn(2, N, 8)
    s = splice_images(ids, text, feats, IMG, mask, labels)
    assert s.inputs_embeds.shape == (2, 4 + N - 1, 8)
    torch.testing.assert_close(s.inputs_embeds[0, 1:1 + N], feats[0])
    torch.testing.assert_close(s.inputs_embeds[0, 1 + N:], text[0, 2:])
    torch.testing.assert_close(s.inputs_embeds[1, :N], feats[1])
    assert s.labels[0].tolist() == [-100] + [IGNORE_INDEX] * N + [5, 6]
    assert s.attention_mask[1].tolist() == [1] * N + [1, 1, 0]


@pytest.mark.parametrize("ids", [
    torch.tensor([[1, 2, 3, 4]]),  # no image token
    torch.tensor([[IMG, IMG, 3, 4]]),  # neither 1 nor N of them
])
def test_splice_rejects_wrong_placeholder_counts(ids):
    with pytest.raises(ValueError, match="image token"):
        splice_images(ids, torch.randn(1, 4, 8), torch.randn(1, N, 8), IMG)


# ----------------------------------------------------------------------------- projectors and stages

@pytest.mark.parametrize("name, params", [
    ("linear", 1024 * 4096 + 4096),  # LLaVA-1
    ("mlp2x_gelu", (1024 * 4096 + 4096) + (4096 * 4096 + 4096)),  # LLaVA-1.5: 20,979,712
])
def test_projector_sizes(name, params):
    with torch.device("meta"):
        proj = PROJECTORS[name](1024, 4096)
    assert sum(p.numel() for p in proj.parameters()) == params


@pytest.mark.parametrize("preset, total, projector, vision", [
    ("llava-7b", 7_046_318_080, 4_198_400, 303_179_776),
    ("llava-1.5-7b", 7_063_427_072, 20_979_712, 303_507_456),  # = llava-hf/llava-1.5-7b-hf
])
def test_stage_counts_at_scale(preset, total, projector, vision):
    with torch.device("meta"):
        model = Llava(multimodal_preset(preset))
    assert set_stage(model, "pretrain") == {"trainable": projector, "frozen": total - projector}
    assert set_stage(model, "finetune") == {"trainable": total - vision, "frozen": vision}  # stage 2: projector too


def test_stages_freeze_the_vision_tower():
    model = Llava(multimodal_preset("llava-tiny"))
    for stage in STAGES:
        set_stage(model, stage)
        assert not any(p.requires_grad for p in model.vision.parameters())
        assert all(p.requires_grad for p in model.projector.parameters())
        assert all(p.requires_grad == (stage == "finetune") for p in model.lm.parameters())
    with pytest.raises(ValueError, match="stage"):
        set_stage(model, "stage3")
    model.train()
    assert model.lm.training and not model.vision.training


# ----------------------------------------------------------------------------- the decoder on embeddings

@pytest.mark.parametrize("lm_preset", ["gpt-tiny", "llama-tiny"])
def test_decode_embeds_equals_token_forward(lm_preset):
    from nanomm.models import build, preset

    torch.manual_seed(0)
    lm = build(preset(lm_preset, n_layer=2, dim=64, n_head=4, ff_dim=128, vocab_size=50)).eval()
    ids = torch.randint(0, 50, (2, 7))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    with torch.no_grad():
        want = lm(ids, attention_mask=mask).logits
        got = decode_embeds(lm, lm.embed_tokens(ids), mask).logits
    torch.testing.assert_close(got, want)  # the same operations in the same order


def test_generate_answers_with_and_without_cache(pair):
    _, ours = pair
    ids = torch.tensor([[0, 1, IMG, 7], [1, IMG, 4, 4]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    s = ours.splice(ids, torch.randn(2, 3, 16, 16), mask)
    runs = [generate(ours, inputs_embeds=s.inputs_embeds, attention_mask=s.attention_mask, max_new_tokens=6,
                     use_cache=c).new_tokens for c in (True, False)]
    assert torch.equal(*runs)


def test_config_checks():
    c = multimodal_preset("llava-tiny")
    with pytest.raises(ValueError, match="image_token_id"):
        LlavaConfig(vision=c.vision, lm=c.lm, image_token_id=c.lm.vocab_size)
    with pytest.raises(ValueError, match="projector"):
        LlavaConfig(vision=c.vision, lm=c.lm, projector="qformer")
    assert LlavaConfig.from_dict(c.to_dict()) == c
