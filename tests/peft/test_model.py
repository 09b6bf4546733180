"""apply / disable / save / load: module selection as peft does it, parameter counts, files both ways."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from nanomm import peft
from nanomm.peft.layer import select_modules


def _ids():
    return torch.randint(0, 99, (2, 6), generator=torch.Generator().manual_seed(0))


SELECT = [  # (target_modules, exclude_modules, expected names in layer 0 of the tiny LLaMA)
    (["q_proj", "v_proj"], None, ["attn.q_proj", "attn.v_proj"]),
    (["attn.o_proj"], None, ["attn.o_proj"]),
    (r"blocks\.0\.mlp\.(gate|up)_proj", None, ["mlp.gate_proj", "mlp.up_proj"]),
    ("all-linear", None, ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj",
                          "mlp.up_proj", "mlp.down_proj"]),
    ("all-linear", ["k_proj", "mlp.down_proj"], ["attn.q_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj",
                                                 "mlp.up_proj"]),
    ("all-linear", r".*\.attn\..*", ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]),
]


@pytest.mark.parametrize("targets, exclude, layer0", SELECT)
def test_selection_follows_peft_rules(tiny, targets, exclude, layer0):
    chosen = select_modules(tiny("llama"), targets, exclude)
    assert [n.removeprefix("blocks.0.") for n in chosen if n.startswith("blocks.0.")] == layer0
    assert "lm_head" not in chosen  # "all-linear" leaves the output head alone, as peft does


@pytest.mark.parametrize("targets, error, message", [
    ("q_proj", ValueError, "matches no module"),  # a string is a regex over the WHOLE name
    (["nothing"], ValueError, "matches no module"),
    (["mlp"], TypeError, r"expected nn.Linear modules only, got \['blocks.0.mlp \(SwiGLU\)'"),
])
def test_selection_errors(tiny, targets, error, message):
    with pytest.raises(error, match=message):
        peft.apply(tiny("llama"), peft.LoraConfig(target_modules=targets))


def test_nested_targets_are_refused(tiny):
    with pytest.raises(ValueError, match="inside other chosen modules"):
        peft.apply(tiny("llama"), peft.AdapterConfig(target_modules=["attn", "attn.o_proj"]))


def test_apply_freezes_the_base_and_counts_like_peft(tiny, capsys):
    model = tiny("gpt")  # tied head: the embedding matrix is counted once
    total = sum(p.numel() for p in model.parameters())
    report = peft.apply(model, peft.LoraConfig(r=2), verbose=True)
    assert report.trainable == 2 * 2 * 2 * (32 + 32)  # 2 layers × (q, v) × r·(in + out)
    assert report.total == total + report.trainable
    assert capsys.readouterr().out.strip() == str(report)
    assert str(report) == (f"trainable params: {report.trainable:,d} || all params: {report.total:,d} || "
                           f"trainable%: {100 * report.trainable / report.total:.4f}")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, _ in model.named_parameters() if ".lora_" in n}


def test_apply_twice_and_wrong_config(tiny):
    model = tiny("llama")
    peft.apply(model, peft.LoraConfig())
    with pytest.raises(ValueError, match="already has adapters"):
        peft.apply(model, peft.IA3Config())
    with pytest.raises(TypeError, match="config: expected one of LoraConfig"):
        peft.apply(tiny("llama"), {"r": 4})


def test_disable_adapters_restores_state_even_on_error(tiny):
    model = tiny("llama")
    with pytest.raises(ValueError, match="no adapters to disable"):
        with peft.disable_adapters(model):
            pass
    peft.apply(model, peft.LoraConfig())
    with pytest.raises(RuntimeError):
        with peft.disable_adapters(model):
            assert not model.blocks[0].attn.q_proj.enabled
            raise RuntimeError
    assert model.blocks[0].attn.q_proj.enabled
    peft.merge(model)
    with pytest.raises(ValueError, match="unmerge"):
        with peft.disable_adapters(model):
            pass


def _randomise(model):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


ROUND_TRIP = {
    "lora": (lambda: peft.LoraConfig(r=3, alpha=5.0, target_modules="all-linear"), "LORA"),
    "ia3": (lambda: peft.IA3Config(), "IA3"),
    "adapter": (lambda: peft.AdapterConfig(bottleneck=4, activation="silu"), "HOULSBY"),
    "prefix": (lambda: peft.PrefixConfig(num_virtual_tokens=2, projection=True), "PREFIX_TUNING"),
}


@pytest.mark.parametrize("family", ["llama", "gpt"])
@pytest.mark.parametrize("method", list(ROUND_TRIP))
def test_save_and_load_round_trip(tiny, tmp_path, method, family):
    make, peft_type = ROUND_TRIP[method]
    model = tiny(family)
    peft.apply(model, make())
    _randomise(model)
    path = peft.save(model, tmp_path / "adapter")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary left behind
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((path / "adapter_config.json").read_text())["peft_type"] == peft_type
    fresh = tiny(family)
    report = peft.load(fresh, path, trainable=True)
    assert report.trainable > 0
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family, key", [
    ("llama", "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"),  # transformers' path: peft reads it
    ("gpt", "base_model.model.blocks.0.attn.q_proj.lora_A.weight"),  # GPT-2 fuses q,k,v: nanomm's own name
])
def test_lora_file_uses_peft_key_names(tiny, tmp_path, family, key):
    model = tiny(family)
    peft.apply(model, peft.LoraConfig())
    peft.save(model, tmp_path / "a")
    assert key in load_file(tmp_path / "a" / "adapter_model.safetensors")


def test_load_errors_leave_the_model_clean(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        peft.load(tiny("llama"), tmp_path / "missing")
    model = tiny("llama")
    peft.apply(model, peft.LoraConfig(r=4))
    peft.save(model, tmp_path / "a")
    cfg_path = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "r": 5}))
    fresh = tiny("llama")
    with pytest.raises(ValueError, match="shape mismatches"):
        peft.load(fresh, tmp_path / "a")
    assert not peft.has_adapters(fresh)
    cfg_path.write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        peft.load(fresh, tmp_path / "a")
    cfg_path.write_text(json.dumps({**cfg, "peft_type": "LOHA"}))
    with pytest.raises(ValueError, match="peft_type 'LOHA' is not supported"):
        peft.load(fresh, tmp_path / "a")
