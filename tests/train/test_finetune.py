"""SFT and DPO recipes on a tiny base built here (a preset + a tokenizer trained on the instruction texts):
packing equals padding, loss only on responses, every PEFT method trains, run folders reload to the
trained model, DPO starts at log 2 and its cached reference equals the live one."""

from __future__ import annotations

import json
import math

import pytest
import torch

from nanomm import peft
from nanomm.data import train_tokenizer
from nanomm.data.instructions import SFTBatches, make_examples
from nanomm.models import build, from_hf, preset, to_hf
from nanomm.train.objectives import token_cross_entropy
from nanomm.train.recipes_finetune import (PEFT_METHODS, apply_peft, generation_scores, load_finetuned,
                                           segment_attention, sft_objective, train_dpo, train_sft)

TASKS = ["add", "compare"]  # the two small tasks: 152 training prompts, 38 held out
QUIET = dict(eval_every=0, save_every=0)  # the recipes evaluate before and after anyway; one checkpoint at the end


@pytest.fixture(scope="module")
def tok():
    texts = [e.prompt + e.chosen + " " + e.rejected for e in make_examples("train") + make_examples("heldout")]
    return train_tokenizer(texts, vocab_size=320)


def tiny(tok, family: str = "llama", seed: int = 0, std: float | None = None):
    """A tiny decoder; ``std`` redraws every matrix: at the presets' 0.02 attention is nearly uniform and
    what a token attends to hardly shows in the logits."""
    torch.manual_seed(seed)
    overrides = dict(vocab_size=tok.vocab_size, n_layer=2, dim=32, n_head=4, ff_dim=64)
    if family == "llama":
        overrides["n_kv_head"] = 2
    model = build(preset(f"{family}-tiny", **overrides)).eval()
    if std is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, std)
    return model


@pytest.fixture(scope="module")
def base_dir(tok, tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    to_hf(tiny(tok), folder)
    tok.save(folder)
    return folder


@pytest.fixture(scope="module")
def sft_dir(base_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    train_sft(out, base_dir, peft="lora", steps=12, batch_size=16, tasks=TASKS, **QUIET)
    return out


# ----------------------------------------------------------------------------- packing

@pytest.mark.parametrize("family,method", [("llama", "none"), ("gpt", "none"), ("llama", "prefix")])
def test_packed_and_padded_batches_give_the_same_loss(tok, family, method):
    model = tiny(tok, family, std=0.2)
    apply_peft(model, method)
    examples = make_examples("train", tasks=TASKS, limit=5)
    padded = next(iter(SFTBatches(examples, tok, 10, shuffle=False).epoch_batches()))
    packed = next(iter(SFTBatches(examples, tok, 10, shuffle=False, pack=True, max_length=96).epoch_batches()))
    assert len(packed["input_ids"]) < len(examples)  # several examples share a row
    with torch.no_grad():
        a, _ = sft_objective(model, padded)
        b, _ = sft_objective(model, packed)
        # without the segment mask, later examples in a row attend to earlier ones: a different loss
        leaky, _ = token_cross_entropy(model(packed["input_ids"], position_ids=packed["position_ids"]).logits,
                                       packed["targets"])
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)  # float32; same sums in a different order
    assert abs(float(leaky - a)) > 1e-2


def test_segment_attention_keeps_examples_apart(tok):
    model = tiny(tok, std=0.2)
    ids = torch.randint(3, tok.vocab_size, (1, 12))
    segments = torch.tensor([[1] * 5 + [2] * 7])
    positions = torch.tensor([list(range(5)) + list(range(7))])
    changed = ids.clone()
    changed[0, :5] = torch.randint(3, tok.vocab_size, (5,))  # only the first example differs
    with torch.no_grad(), segment_attention(model, segments):
        x = model(ids, position_ids=positions).logits
        y = model(changed, position_ids=positions).logits
    torch.testing.assert_close(x[0, 5:], y[0, 5:], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(x[0, :5], y[0, :5])
    assert not model.blocks[0]._forward_pre_hooks  # the hooks are gone after the block


# ----------------------------------------------------------------------------- SFT

@pytest.mark.parametrize("method", list(PEFT_METHODS))
def test_sft_lowers_the_held_out_loss_and_its_folder_reloads(base_dir, tmp_path, method):
    r = train_sft(tmp_path, base_dir, peft=method, steps=8, batch_size=16, tasks=TASKS, **QUIET)
    m = r.metrics
    assert m["val_loss"] < m["val_loss_before"]
    assert m["merged"] is (method in ("none", "lora", "ia3"))
    assert (m["trainable_percent"] == 100.0) is (method == "none")
    for key in ("chosen_rate_before", "chosen_rate_after", "chosen_rate/add_after", "seconds_train"):
        assert key in m
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "loss.png", "results.json"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "adapter" / "adapter_config.json").is_file() is (method != "none")
    if method != "none":  # the folder reloads to base + adapter: merged weights, or the base with its adapter
        loaded, _ = load_finetuned(tmp_path)
        reference = from_hf(base_dir)
        peft.load(reference, tmp_path / "adapter")
        ids = torch.randint(3, 300, (2, 7))
        with torch.no_grad():
            # float32: merging rounds W + (α/r)BA once; 1e-5 is far above that and far below any real difference
            torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)


def test_generation_scores_report_rates_per_task(base_dir):
    model, tok = load_finetuned(base_dir)
    examples = make_examples("heldout", tasks=TASKS, limit=3)
    rates, answers = generation_scores(model, tok, examples, batch_size=4)
    assert len(answers) == 6 and {a["task"] for a in answers} == set(TASKS)
    assert set(rates) == {"chosen_rate", "chosen_rate/add", "chosen_rate/compare", "chosen_rate_macro"}
    assert all(0.0 <= v <= 1.0 for v in rates.values())


# ----------------------------------------------------------------------------- DPO

@pytest.mark.parametrize("method", ["lora", "none"])
def test_dpo_starts_at_log2_and_cached_reference_equals_live_reference(sft_dir, tmp_path, method):
    runs = [train_dpo(tmp_path / str(pre), sft_dir, peft=method, steps=6, batch_size=8, tasks=["capitals"], lr=5e-3,
                      precompute_reference=pre, **QUIET).metrics for pre in (True, False)]
    cached, live = runs
    assert cached["val_loss_before"] == pytest.approx(math.log(2), abs=1e-6)
    assert cached["val_rewards/accuracies_before"] == 0.0  # all rewards tie at 0: no pair is a win yet
    assert cached["val_loss"] < math.log(2)
    for key in ("val_loss", "val_rewards/chosen", "val_rewards/rejected", "val_rewards/margins",
                "val_rewards/accuracies"):
        assert cached[key] == pytest.approx(live[key], abs=1e-5), key  # same numbers, float32 reruns
    for key in ("chosen_rate_before", "chosen_rate_after", "policy_prefers_chosen_after", "seconds_train"):
        assert key in cached
    assert (tmp_path / "True" / "reference_logps.safetensors").is_file()
    assert json.loads((tmp_path / "True" / "results.json").read_text())["beta"] == 0.1


def test_dpo_refuses_an_unmerged_sft_folder(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"peft": "prefix", "merged": False}))
    with pytest.raises(ValueError, match="sft_dir: .* cannot be merged"):
        train_dpo(tmp_path / "out", tmp_path)


@pytest.mark.parametrize("call", [
    lambda d: train_sft(d, d, peft="bitfit"),
    lambda d: train_dpo(d, d, peft="bitfit"),
])
def test_unknown_methods_are_named(tmp_path, call):
    with pytest.raises(ValueError, match="peft: expected one of"):
        call(tmp_path)
