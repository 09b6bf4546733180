"""ViT: token counts of the presets, equality with transformers' CLIP vision tower, patch embedding."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanomm.models.vision_config import ViTConfig, vision_preset
from nanomm.models.vit import PatchEmbedding, ViT
from nanomm.nn.mlp import quick_gelu

tf = pytest.importorskip("transformers")

# float32 through a few layers of width 32: observed differences are ~1e-6; 1e-5 leaves a margin
# while a swapped norm, a missing bias or a wrong activation moves outputs by > 1e-2
ATOL = 1e-5


@pytest.mark.parametrize("name, size, tokens, dim", [
    ("vit-l-14", 224, 257, 1024),  # BLIP-2 and LLaVA-1: 16² + 1
    ("vit-l-14-336", 336, 577, 1024),  # LLaVA-1.5: 24² + 1
    ("vit-b-32", 224, 50, 768),
    ("vit-g-14", 224, 257, 1408),  # BLIP-2's EVA ViT-g
])
def test_preset_token_counts(name, size, tokens, dim):
    c = vision_preset(name)
    assert (c.image_size, c.n_tokens, c.dim) == (size, tokens, dim)


def test_vit_l_14_gives_257_tokens_at_224_px():
    with torch.device("meta"):  # the real forward, on shapes only: no memory is allocated
        model = ViT(vision_preset("vit-l-14"))
        out = model(torch.empty(2, 3, 224, 224))
        feats = model.features(torch.empty(2, 3, 224, 224))
    assert tuple(out.last_hidden_state.shape) == (2, 257, 1024)
    assert tuple(out.pooler_output.shape) == (2, 1024)
    assert tuple(feats.shape) == (2, 256, 1024)  # LLaVA's input: the penultimate layer without [CLS]


def test_vit_l_14_parameter_count_equals_transformers():
    hf_kwargs = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     patch_size=14, image_size=224)
    with torch.device("meta"):
        ours = ViT(vision_preset("vit-l-14"))
        theirs = tf.CLIPVisionModel(tf.CLIPVisionConfig(**hf_kwargs))
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in theirs.parameters()) == 303_179_776


HF_VISION = dict(image_size=30, patch_size=6, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                 num_attention_heads=4)


@pytest.fixture(scope="module")
def pair():
    """A random transformers CLIPVisionModel (norms perturbed) and nanomm's ViT with its weights."""
    from nanomm.models.clip import CLIP_VISION_RULES, map_in, our_weights
    from nanomm.models.hub_formats import Family

    torch.manual_seed(0)
    hf = tf.CLIPVisionModel(tf.CLIPVisionConfig(**HF_VISION)).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    ours = ViT(ViTConfig(image_size=30, patch_size=6, n_layer=3, n_head=4, dim=32, ff_dim=37)).eval()
    family = Family("clip_vision", "", (), CLIP_VISION_RULES, None, None)
    state = {k.removeprefix("vision_model."): v for k, v in hf.state_dict().items()}
    weights, _ = our_weights(ours)
    with torch.no_grad():
        for name, value in map_in(family, state, ours).items():
            weights[name].copy_(value)
    return hf, ours


def test_equals_transformers_clip_vision(pair):
    hf, ours = pair
    px = torch.randn(3, 3, 30, 30, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(px, output_hidden_states=True)
        got = ours(px, output_hidden_states=True)
    assert len(got.hidden_states) == len(want.hidden_states) == 4  # embeddings + 3 blocks
    for g, w in zip(got.hidden_states, want.hidden_states):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=ATOL, rtol=0)


@pytest.mark.parametrize("layer, drop_cls", [(-2, True), (-2, False), (-1, True), (0, False), (1, True)])
def test_features_pick_a_layer(pair, layer, drop_cls):
    hf, ours = pair
    px = torch.randn(2, 3, 30, 30, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = hf(px, output_hidden_states=True).hidden_states[layer]
        got = ours.features(px, layer, drop_cls=drop_cls)
    torch.testing.assert_close(got, want[:, 1:] if drop_cls else want, atol=ATOL, rtol=0)


def test_final_norm_all_normalises_every_token():
    torch.manual_seed(0)
    model = ViT(ViTConfig(image_size=16, patch_size=4, n_layer=1, n_head=2, dim=16, ff_dim=32, final_norm="all",
                          pre_norm=False, patch_bias=True, activation="gelu")).eval()
    out = model(torch.randn(2, 3, 16, 16), output_hidden_states=True)
    torch.testing.assert_close(out.last_hidden_state, model.post_norm(out.hidden_states[-1]))
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[:, 0])
    assert model.patch_embed.proj.bias is not None and isinstance(model.pre_norm, torch.nn.Identity)


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 3), st.sampled_from([2, 3, 4]), st.integers(1, 3), st.integers(0, 10_000))
def test_patch_embedding_is_a_linear_map_of_each_patch(batch, patch, grid, seed):
    # a stride-P P×P convolution = flatten each patch, multiply by W (d, 3·P·P): the ViT paper's Eq. 1
    g = torch.Generator().manual_seed(seed)
    emb = PatchEmbedding(3, 8, patch, bias=True)
    x = torch.randn(batch, 3, grid * patch, grid * patch, generator=g, dtype=torch.float64)
    emb = emb.double()
    patches = x.unfold(2, patch, patch).unfold(3, patch, patch)  # (B, 3, g, g, P, P)
    flat = patches.permute(0, 2, 3, 1, 4, 5).reshape(batch, grid * grid, 3 * patch * patch)  # row-major patches
    want = flat @ emb.proj.weight.reshape(8, -1).T + emb.proj.bias
    torch.testing.assert_close(emb(x), want, atol=1e-12, rtol=0)


def test_quick_gelu_is_transformers():
    x = torch.linspace(-6, 6, 101, dtype=torch.float64)
    from transformers.activations import ACT2FN

    torch.testing.assert_close(quick_gelu(x), ACT2FN["quick_gelu"](x), atol=1e-15, rtol=0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(image_size=30, patch_size=7), "patch_size"), (dict(dim=30, n_head=4), "n_head"),
    (dict(activation="swish"), "activation"), (dict(final_norm="none"), "final_norm"), (dict(n_layer=0), "n_layer"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ViTConfig(**kwargs)


def test_input_validation():
    model = ViT(vision_preset("vit-tiny"))
    with pytest.raises(ValueError, match=r"pixel_values: expected a float tensor \(B, 3, 48, 48\)"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="layer"):
        model.features(torch.randn(1, 3, 48, 48), layer=5)
    with pytest.raises(ValueError, match="unknown preset"):
        vision_preset("vit-h-99")
