"""BLIP-2: what each stage trains, the stage-1 losses, equality with transformers' retrieval heads, captioning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import Blip2Config as HFBlip2Config
from transformers import Blip2ForImageTextRetrieval, Blip2QFormerConfig, Blip2VisionConfig

from nanomm.models.blip2 import STAGES, Blip2, set_stage
from nanomm.models.multimodal_config import Blip2Config, multimodal_preset
from nanomm.models.qformer import load_hf_qformer
from nanomm.train import objectives_blip2 as ob

B, T = 4, 6


@pytest.fixture(scope="module")
def model() -> Blip2:
    torch.manual_seed(0)
    return Blip2(multimodal_preset("blip2-tiny"))


def _batch(model: Blip2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    c = model.config
    ids = torch.randint(3, c.lm.vocab_size - 1, (B, T), generator=g)
    ids[:, 0] = 2  # the [CLS] / bos position
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, -2:] = 0
    pixels = torch.randn(B, 3, c.vision.image_size, c.vision.image_size, generator=g)
    return {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask}


def _count(model, prefixes) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefixes))


# ----------------------------------------------------------------------------- what trains

def test_stage_counts_tiny(model):
    total = sum(p.numel() for p in model.parameters())
    rep = set_stage(model, "representation")
    heads = _count(model, ("qformer.", "ln_vision.", "vision_proj.", "text_proj.", "itm_head.", "temp"))
    assert rep == {"trainable": heads, "frozen": total - heads}
    gen = set_stage(model, "generative")
    text_only = _count(model, ("qformer.embeddings.word.", "qformer.embeddings.position.", "qformer.lm_head.")) + sum(
        p.numel() for n, p in model.named_parameters() if ".mlp_text." in n or ".norm_text." in n)
    want = _count(model, ("qformer.", "ln_vision.", "lm_proj.")) - text_only
    assert gen == {"trainable": want, "frozen": total - want}
    for stage in STAGES:  # the image encoder and the LLM stay frozen in both stages
        set_stage(model, stage)
        assert not any(p.requires_grad for p in model.vision.parameters())
        assert not any(p.requires_grad for p in model.lm.parameters())
    set_stage(model, "representation")


def test_stage_counts_blip2_opt_2_7b():
    with torch.device("meta"):
        big = Blip2(multimodal_preset("blip2-opt-2.7b"))
    qformer = sum(p.numel() for p in big.qformer.parameters())
    assert qformer == 186_307_387  # the paper's "188M": the Q-Former with its 32 queries
    gen = set_stage(big, "generative")
    # Q-Former without its text-only parts (105,162,240) + ln_vision (2 × 1408) + projection 768 → 2560
    assert gen["trainable"] == 105_162_240 + 2 * 1408 + (768 * 2560 + 2560) == 107_133_696
    assert sum(p.numel() for p in big.vision.parameters()) == 985_952_256  # EVA ViT-g/14, 39 blocks
    assert gen["frozen"] > 3.6e9  # ViT-g + OPT-2.7B + the unused text parts


@pytest.mark.parametrize("stage, objective", [("representation", ob.stage1), ("generative", ob.stage2)])
def test_gradients_reach_only_the_stage(model, stage, objective):
    set_stage(model, stage)
    model.zero_grad(set_to_none=True)
    loss, metrics = objective(model, _batch(model))
    loss.backward()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    reached = [n for n, g in grads.items() if g is not None and bool(g.abs().sum() > 0)]
    assert any(n.startswith("qformer.layers.0.cross_attn.") for n in reached)  # the queries read the image
    if stage == "generative":
        assert any(n.startswith("lm_proj.") for n in reached)
    model.zero_grad(set_to_none=True)
    set_stage(model, "representation")


def test_frozen_parts_stay_in_eval_mode(model):
    model.train()
    assert model.qformer.training and not model.vision.training and not model.lm.training
    model.eval()


# ----------------------------------------------------------------------------- the stage-1 losses

def test_itc_is_max_over_queries_with_temperature(model):
    torch.manual_seed(3)
    b = _batch(model)
    q = model.query_output(model.image_embeds(b["pixel_values"]))
    loss, s_i2t, s_t2i, _ = ob.itc_loss(model, q, b["input_ids"], b["attention_mask"])
    z = F.normalize(model.vision_proj(q), dim=-1)  # (B, N_q, e)
    t = F.normalize(model.text_proj(model.qformer(None, b["input_ids"], b["attention_mask"]).text_output[:, 0]), dim=-1)
    manual = torch.stack([torch.stack([(z[i] @ t[j]).max() for j in range(B)]) for i in range(B)]) / model.temp
    torch.testing.assert_close(s_i2t, manual)  # same numbers, summed in another order
    torch.testing.assert_close(s_t2i, manual.t())
    y = torch.arange(B)
    want = (F.cross_entropy(manual, y, label_smoothing=0.1) + F.cross_entropy(manual.t(), y, label_smoothing=0.1)) / 2
    torch.testing.assert_close(loss, want)
    assert float(model.temp.detach()) == pytest.approx(0.07)  # the initial temperature


def test_temperature_is_clamped(model):
    with torch.no_grad():
        model.temp.fill_(5.0)
    b = _batch(model)
    ob.itc_loss(model, model.query_output(model.image_embeds(b["pixel_values"])), b["input_ids"], b["attention_mask"])
    assert float(model.temp.detach()) == ob.TEMPERATURE_RANGE[1]
    with torch.no_grad():
        model.temp.fill_(0.07)


def test_hard_negatives_avoid_positives():
    torch.manual_seed(0)
    sim = torch.randn(6, 6) * 5
    same = torch.eye(6, dtype=torch.bool)
    same[0, 1] = same[1, 0] = True  # rows 0 and 1 hold the same text
    for _ in range(50):
        neg = ob.hard_negatives(sim, same)
        assert not bool(same[torch.arange(6), neg].any())
    # draws follow softmax(sim): a column with a much larger similarity is picked almost always
    sim = torch.zeros(3, 3)
    sim[0, 2] = 20.0
    assert all(int(ob.hard_negatives(sim, torch.eye(3, dtype=torch.bool))[0]) == 2 for _ in range(20))


def test_itm_batch_is_one_positive_two_negatives(model, monkeypatch):
    seen = {}
    real = model.itm_logits

    def spy(images, ids, mask):
        seen["n"] = images.shape[0]
        return real(images, ids, mask)

    monkeypatch.setattr(model, "itm_logits", spy)
    b = _batch(model)
    e = model.image_embeds(b["pixel_values"])
    sim = torch.randn(B, B)
    loss, acc = ob.itm_loss(model, e, b["input_ids"], b["attention_mask"], sim, sim.t())
    assert seen["n"] == 3 * B and torch.isfinite(loss) and 0.0 <= acc <= 1.0


def test_stage1_on_random_image_features_is_finite(model):
    loss, m = ob.stage1(model, _batch(model))
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(m["itc_loss"] + m["itm_loss"] + m["itg_loss"], rel=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        ob.stage1(model, {k: v[:1] for k, v in _batch(model).items()})
    with pytest.raises(ValueError, match="one of pixel_values / vision_states"):
        ob.stage2(model, {"input_ids": torch.zeros(2, 3, dtype=torch.long)})
    # the frozen ViT's states stand in for the pixels and give the same loss
    b = _batch(model)
    states = model.vision_states(b.pop("pixel_values"))
    torch.manual_seed(0)
    from_states, _ = ob.stage2(model, {**b, "vision_states": states})
    torch.manual_seed(0)
    from_pixels, _ = ob.stage2(model, _batch(model))
    torch.testing.assert_close(from_states, from_pixels)


# ----------------------------------------------------------------------------- against transformers

def test_retrieval_heads_equal_transformers(tmp_path):
    """ITC similarities and ITM logits of transformers' Blip2ForImageTextRetrieval, on its own vision
    features, with the same Q-Former and head weights."""
    hc = HFBlip2Config(
        vision_config=Blip2VisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=16, patch_size=8),
        qformer_config=Blip2QFormerConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=40, max_position_embeddings=16, encoder_hidden_size=24,
                                          use_qformer_text_input=True),
        num_query_tokens=5, image_text_hidden_size=12)
    torch.manual_seed(0)
    hf = Blip2ForImageTextRetrieval(hc)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(-0.5, 0.5)
    hf.save_pretrained(tmp_path)
    hf = Blip2ForImageTextRetrieval.from_pretrained(tmp_path).eval()
    c = multimodal_preset("blip2-tiny")
    q = c.qformer.replace(vocab_size=50, max_positions=16, n_layer=2, n_head=4, dim=32, ff_dim=40, n_query=5,
                          cross_dim=24, dec_token_id=49)
    ours = Blip2(Blip2Config(vision=c.vision.replace(dim=24, n_head=2), qformer=q, lm=c.lm, embed_dim=12)).eval()
    sd = {k: v for k, v in hf.state_dict().items()}
    extra = {"query_tokens": sd["query_tokens"], "embeddings.word.weight": sd["embeddings.word_embeddings.weight"],
             "embeddings.position.weight": sd["embeddings.position_embeddings.weight"]}
    load_hf_qformer(ours.qformer, {k[len("qformer."):]: v for k, v in sd.items() if k.startswith("qformer.")},
                    extra=extra)
    with torch.no_grad():
        for ours_name, hf_name in (("vision_proj", "vision_projection"), ("text_proj", "text_projection"),
                                   ("itm_head", "itm_head")):
            getattr(ours, ours_name).weight.copy_(sd[f"{hf_name}.weight"])
            getattr(ours, ours_name).bias.copy_(sd[f"{hf_name}.bias"])
    pixels = torch.randn(3, 3, 16, 16)
    ids = torch.randint(0, 50, (3, 7))
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 7])
    with torch.no_grad():
        image_embeds = hf.vision_model(pixel_values=pixels).last_hidden_state  # (3, 5, 24)
        sim = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits_per_image
        itm = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask,
                 use_image_text_matching_head=True).logits_per_image
        ours_sim = ours.similarity(ours.image_feats(ours.query_output(image_embeds)), ours.text_feat(ids, mask))
        ours_itm = ours.itm_logits(image_embeds, ids, mask)
    torch.testing.assert_close(ours_sim, sim, atol=1e-5, rtol=0)  # float32, same weights: rounding only
    torch.testing.assert_close(ours_itm, itm, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- the LM side

def test_prefix_forward_and_caption(model):
    b = _batch(model)
    out = model(input_ids=b["input_ids"], pixel_values=b["pixel_values"], attention_mask=b["attention_mask"])
    n_q = model.config.qformer.n_query
    assert out.logits.shape == (B, n_q + T, model.config.lm.vocab_size)
    # the same logits from the prefix given as embeddings
    embeds = torch.cat([model.visual_prefix(b["pixel_values"]), model.lm.embed_tokens(b["input_ids"])], 1)
    mask = torch.cat([torch.ones(B, n_q, dtype=torch.long), b["attention_mask"]], 1)
    torch.testing.assert_close(model(inputs_embeds=embeds, attention_mask=mask).logits, out.logits)
    cached = model.caption(b["pixel_values"], 2, 3, max_new_tokens=5)
    from nanomm.models.generation import generate

    bos = model.lm.embed_tokens(torch.full((B, 1), 2))
    plain = generate(model, inputs_embeds=torch.cat([model.visual_prefix(b["pixel_values"]), bos], 1),
                     max_new_tokens=5, eos_token_id=3, use_cache=False).new_tokens
    assert torch.equal(cached, plain)  # the KV cache changes nothing


def test_config_checks():
    c = multimodal_preset("blip2-tiny")
    with pytest.raises(ValueError, match="cross_dim"):
        Blip2Config(vision=c.vision, qformer=c.qformer.replace(cross_dim=7), lm=c.lm)
    with pytest.raises(TypeError, match="lm"):
        Blip2Config(vision=c.vision, qformer=c.qformer, lm=c.qformer)
    assert Blip2Config.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown keys"):
        Blip2Config.from_dict({**c.to_dict(), "stages": 3})
