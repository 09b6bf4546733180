"""Parameter counts: the audited figures, analytic == built-on-meta for every preset, the size table."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanomm.models import BertConfig, GPTConfig, LlamaConfig, build, count_params, preset, preset_names
from nanomm.models.params import NOTES_SIZES, PARTS, params_rows, print_params_table, size_verdict


def _numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied parameters are counted once


# the exact figures of shared/notes/audit.md
@pytest.mark.parametrize("name, overrides, expected", [
    ("bert-base", {"task": "base"}, 109_482_240),
    ("bert-base", {}, 110_106_428),
    ("bert-large", {"task": "base"}, 335_141_888),
    ("bert-large", {}, 336_226_108),
    ("gpt1", {}, 116_534_784),
    ("gpt2", {}, 124_439_808),
    ("gpt2-xl", {}, 1_557_611_200),
    ("gpt3-175b", {}, 174_604_259_328),
    ("llama-7b", {}, 6_738_415_616),
])
def test_audited_counts(name, overrides, expected):
    assert count_params(preset(name, **overrides)).total == expected


@pytest.mark.parametrize("name", preset_names())
def test_build_on_meta_matches_the_analytic_count(name):
    model = build(preset(name), device="meta")
    assert all(p.is_meta for p in model.parameters())  # nothing allocated, GPT-3 included
    assert _numel(model) == count_params(preset(name)).total


def test_breakdown_of_gpt2_by_the_formula():
    d, f, V, P, L = 768, 3072, 50257, 1024, 12
    parts = count_params(preset("gpt2")).breakdown
    assert set(parts) == set(PARTS)
    assert parts["embeddings"] == V * d + P * d
    assert parts["attention"] == L * (4 * d * d + 4 * d)
    assert parts["mlp"] == L * (2 * d * f + f + d)
    assert parts["norms"] == L * 4 * d + 2 * d
    assert parts["head"] == 0  # tied


def test_breakdown_sums_to_total_and_bert_heads_are_the_difference():
    full, base = count_params(preset("bert-base")), count_params(preset("bert-base", task="base"))
    assert sum(full.breakdown.values()) == full.total
    assert full.total - base.total == full.breakdown["pretraining_heads"] == 624_188
    assert full.breakdown["pooler"] == 768 * 768 + 768


def _random_config(draw) -> object:
    family = draw(st.sampled_from(["bert", "gpt", "llama"]))
    n_head = draw(st.sampled_from([1, 2, 4]))
    common = dict(vocab_size=draw(st.integers(5, 60)), max_positions=draw(st.integers(4, 40)),
                  n_layer=draw(st.integers(1, 3)), n_head=n_head, dim=n_head * draw(st.sampled_from([2, 4, 8])),
                  ff_dim=draw(st.integers(1, 50)))
    if family == "bert":
        task = draw(st.sampled_from(["base", "pretraining"]))
        return BertConfig(**common, type_vocab_size=draw(st.integers(1, 3)), task=task,
                          pooler=task == "pretraining" or draw(st.booleans()))
    position = draw(st.sampled_from(["learned", "sinusoidal", "alibi", "rope"]))
    tie = draw(st.booleans())
    if family == "gpt":
        return GPTConfig(**common, position=position, tie_embeddings=tie, bias=draw(st.booleans()),
                         final_norm=draw(st.booleans()), norm_placement=draw(st.sampled_from(["pre", "post"])))
    return LlamaConfig(**common, position=position, tie_embeddings=tie,
                       n_kv_head=draw(st.sampled_from([h for h in (1, 2, 4) if n_head % h == 0])))


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_analytic_count_equals_built_model_for_any_config(data):
    config = _random_config(data.draw)
    assert _numel(build(config, device="meta")) == count_params(config).total


@pytest.mark.parametrize("name, verdict", [
    ("bert-base", "approx"), ("bert-large", "wrong"), ("gpt1", "approx"),
    ("gpt2-xl", "holds"), ("gpt3-175b", "holds"), ("llama-7b", "holds"),
])
def test_verdicts_against_the_notes_match_the_audit(name, verdict):
    row = next(r for r in params_rows([name]) if r.preset == name)
    assert row.notes == NOTES_SIZES[name].text
    assert row.verdict == verdict


def test_size_verdict_thresholds():
    notes = NOTES_SIZES["bert-large"]  # a count claim: 0.1% holds, 1% approx
    assert size_verdict(notes, 340_000_000) == "holds"
    assert size_verdict(notes, 337_000_000) == "approx"
    assert size_verdict(notes, 300_000_000) == "wrong"


def test_params_rows_default_to_every_preset_and_reject_unknown():
    assert [r.preset for r in params_rows([])] == preset_names()
    with pytest.raises(ValueError, match="valid presets"):
        params_rows(["gpt5"])


def test_print_params_table_shows_counts_and_verdicts(capsys):
    print_params_table(["bert-base", "gpt2-xl"])
    out = capsys.readouterr().out
    assert "110,106,428" in out and "109,482,240" in out and "1,557,611,200" in out
    assert "approx" in out and "holds" in out
