"""nanomm.peft against Hugging Face peft on the same tiny LLaMA: outputs, parameter counts, files both ways.

Tolerance: atol 1e-5 on logits of size ~1 in float32. Both sides compute the same products in a
different order (fused vs separate projections, sdpa vs eager attention), which moves results by a
few float32 ulps (~1e-7 relative) per operation; 1e-5 leaves room for that across two layers and
is far below the effect of any real difference (a wrong scale or a missed module changes logits by
more than 1e-2 here).
"""

from __future__ import annotations

import pytest
import torch

from nanomm import peft as nperft
from nanomm.peft.hf_names import HfNames

hf_peft = pytest.importorskip("peft")

ATOL = 1e-5


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _copy_from_peft(peft_model, ours):
    """Copy peft's adapter tensors into nanomm's adapted model, translating module names."""
    names = HfNames(ours)
    own = dict(ours.named_parameters())
    n = 0
    for key, value in peft_model.named_parameters():
        if ".default" not in key:
            continue
        stem = key.removeprefix("base_model.model.").replace(".default", "")
        module, _, leaf = stem.rpartition(".lora_") if ".lora_" in stem else stem.rpartition(".ia3_l")
        target = (f"{names.from_hf(module)}.lora_{leaf}" if ".lora_" in stem else f"{names.from_hf(module)}.ia3_l")
        with torch.no_grad():
            own[target].copy_(value.reshape(own[target].shape))
        n += 1
    return n


def test_base_models_agree(llama_pair, ids):
    hf, ours, _ = llama_pair
    torch.testing.assert_close(_logits(ours, ids), _logits(hf, ids), atol=ATOL, rtol=0)


LORA_CASES = {  # name -> (nanomm config, peft config kwargs)
    "q,v r=4": (dict(r=4, alpha=8.0, target_modules=["q_proj", "v_proj"]),
                dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "all-linear rslora": (dict(r=2, alpha=6.0, target_modules="all-linear", use_rslora=True),
                          dict(r=2, lora_alpha=6, target_modules="all-linear", use_rslora=True)),
    "regex, exclude": (dict(r=3, alpha=3.0, target_modules=r".*mlp\.(up|down)_proj", exclude_modules=["up_proj"]),
                       dict(r=3, lora_alpha=3, target_modules=r".*mlp\.(up|down)_proj", exclude_modules=["up_proj"])),
}


@pytest.mark.parametrize("case", list(LORA_CASES))
def test_lora_outputs_equal_peft(llama_pair, ids, case):
    hf, ours, _ = llama_pair
    ours_cfg, peft_cfg = LORA_CASES[case]
    # init_lora_weights=False: B is random too, so the LoRA path actually contributes
    pm = hf_peft.get_peft_model(hf, hf_peft.LoraConfig(init_lora_weights=False, **peft_cfg)).eval()
    report = nperft.apply(ours, nperft.LoraConfig(**ours_cfg))
    assert _copy_from_peft(pm, ours) == 2 * len(report.targets)
    expected = _logits(pm, ids)
    with pm.disable_adapter():
        assert (expected - _logits(pm, ids)).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(_logits(ours, ids), expected, atol=ATOL, rtol=0)
    # merged: both write W + s·BA into the weights
    merged_theirs = _logits(pm.merge_and_unload(), ids)
    nperft.merge_and_unload(ours)
    torch.testing.assert_close(_logits(ours, ids), merged_theirs, atol=ATOL, rtol=0)


def test_ia3_outputs_equal_peft(llama_pair, ids):
    hf, ours, _ = llama_pair
    pm = hf_peft.get_peft_model(hf, hf_peft.IA3Config(init_ia3_weights=False)).eval()  # random vectors
    report = nperft.apply(ours, nperft.IA3Config())
    assert _copy_from_peft(pm, ours) == len(report.targets) == 6  # k, v, down in 2 layers
    expected = _logits(pm, ids)
    torch.testing.assert_close(_logits(ours, ids), expected, atol=ATOL, rtol=0)
    merged_theirs = _logits(pm.merge_and_unload(), ids)
    nperft.merge_and_unload(ours)
    torch.testing.assert_close(_logits(ours, ids), merged_theirs, atol=ATOL, rtol=0)


_EXCLUDE, _QKU = ["o_proj", "gate_proj"], ["q_proj", "k_proj", "up_proj"]
COUNT_CASES = {  # name -> (nanomm config, peft config)
    "lora default": (lambda: nperft.LoraConfig(), lambda: hf_peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"])),
    "lora all-linear r16": (lambda: nperft.LoraConfig(r=16, target_modules="all-linear"),
                            lambda: hf_peft.LoraConfig(r=16, target_modules="all-linear")),
    "lora mlp regex": (lambda: nperft.LoraConfig(r=2, target_modules=r".*\.mlp\.(gate|down)_proj"),
                       lambda: hf_peft.LoraConfig(r=2, target_modules=r".*\.mlp\.(gate|down)_proj")),
    "lora exclude": (lambda: nperft.LoraConfig(r=4, target_modules="all-linear", exclude_modules=_EXCLUDE),
                     lambda: hf_peft.LoraConfig(r=4, target_modules="all-linear", exclude_modules=_EXCLUDE)),
    "ia3 default": (lambda: nperft.IA3Config(), lambda: hf_peft.IA3Config()),
    "ia3 q,k,up": (lambda: nperft.IA3Config(target_modules=_QKU, feedforward_modules=["up_proj"]),
                   lambda: hf_peft.IA3Config(target_modules=_QKU, feedforward_modules=["up_proj"])),
    "prefix 5": (lambda: nperft.PrefixConfig(num_virtual_tokens=5),
                 lambda: hf_peft.PrefixTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM")),
    "prefix mlp": (lambda: nperft.PrefixConfig(num_virtual_tokens=4, projection=True, projection_hidden=24),
                   lambda: hf_peft.PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM",
                                                      prefix_projection=True, encoder_hidden_size=24)),
}


@pytest.mark.parametrize("case", list(COUNT_CASES))
def test_trainable_counts_equal_peft(llama_pair, case):
    hf, ours, _ = llama_pair
    ours_cfg, peft_cfg = COUNT_CASES[case]
    theirs = hf_peft.get_peft_model(hf, peft_cfg()).get_nb_trainable_parameters()
    report = nperft.apply(ours, ours_cfg())
    assert (report.trainable, report.total) == theirs
    assert str(report).startswith(f"trainable params: {theirs[0]:,d} || all params: {theirs[1]:,d}")


def _randomise(model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.3 * torch.randn(p.shape, generator=g) + (1.0 if p.dim() == 1 else 0.0))


SAVE_CASES = {
    "lora": lambda: nperft.LoraConfig(r=4, alpha=8.0, target_modules="all-linear"),
    "lora q,v rslora": lambda: nperft.LoraConfig(r=2, alpha=4.0, use_rslora=True),
    "ia3": lambda: nperft.IA3Config(),
    "prefix": lambda: nperft.PrefixConfig(num_virtual_tokens=3),
    "prefix mlp": lambda: nperft.PrefixConfig(num_virtual_tokens=3, projection=True, projection_hidden=20),
}


@pytest.mark.parametrize("case", list(SAVE_CASES))
def test_nanomm_adapter_loads_in_peft(llama_pair, ids, tmp_path, case):
    hf, ours, _ = llama_pair
    nperft.apply(ours, SAVE_CASES[case]())
    _randomise(ours)
    nperft.save(ours, tmp_path / "adapter")
    pm = hf_peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    torch.testing.assert_close(_logits(pm, ids), _logits(ours, ids), atol=ATOL, rtol=0)
    with pm.disable_adapter():
        assert (_logits(pm, ids) - _logits(ours, ids)).abs().max() > 1e-3  # the adapter matters


PEFT_CASES = {
    "lora": lambda: hf_peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "down_proj"],
                                       init_lora_weights=False),
    "ia3": lambda: hf_peft.IA3Config(init_ia3_weights=False),
    "prefix": lambda: hf_peft.PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
    "prefix mlp": lambda: hf_peft.PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM",
                                                     prefix_projection=True, encoder_hidden_size=12),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_adapter_loads_in_nanomm(llama_pair, ids, tmp_path, case):
    hf, ours, _ = llama_pair
    pm = hf_peft.get_peft_model(hf, PEFT_CASES[case]())
    _randomise(pm)
    pm.eval().save_pretrained(tmp_path / "adapter")
    report = nperft.load(ours, tmp_path / "adapter")
    assert report.trainable == 0  # loaded for inference, as peft's is_trainable=False
    torch.testing.assert_close(_logits(ours, ids), _logits(pm, ids), atol=ATOL, rtol=0)
    with nperft.disable_adapters(ours):
        assert (_logits(ours, ids) - _logits(pm, ids)).abs().max() > 1e-3  # the adapter matters


@pytest.mark.parametrize("config", [
    lambda: nperft.LoraConfig(r=2, target_modules="all-linear"),  # encoder, pooler, MLM transform, NSP head
    lambda: nperft.IA3Config(),  # key, value and the FFN output: HF names both "output.dense"s alike
], ids=["lora", "ia3"])
def test_bert_adapter_loads_in_peft(bert_pair, tmp_path, config):
    hf, ours = bert_pair
    report = nperft.apply(ours, config())
    _randomise(ours)
    nperft.save(ours, tmp_path / "adapter")
    pm = hf_peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    assert sum(1 for m in pm.modules() if isinstance(m, hf_peft.tuners.tuners_utils.BaseTunerLayer)) == \
        len(report.targets)
    ids = torch.randint(0, 99, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        theirs, mine = pm(ids), ours(ids)
    torch.testing.assert_close(mine.prediction_logits, theirs.prediction_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(mine.seq_relationship_logits, theirs.seq_relationship_logits, atol=ATOL, rtol=0)
