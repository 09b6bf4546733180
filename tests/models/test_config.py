"""Configs: presets as data, help on every field, unknown keys and bad values rejected by name."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanomm.models import BertConfig, GPTConfig, LlamaConfig, describe, preset, preset_names
from nanomm.models.config import PRESETS

FAMILIES = [BertConfig, GPTConfig, LlamaConfig]


@pytest.mark.parametrize("name, cls, fields", [
    ("bert-base", BertConfig, dict(n_layer=12, dim=768, n_head=12, ff_dim=3072, vocab_size=30522,
                                   layer_norm_eps=1e-12)),
    ("bert-large", BertConfig, dict(n_layer=24, dim=1024, n_head=16, ff_dim=4096)),
    ("gpt1", GPTConfig, dict(vocab_size=40478, max_positions=512, norm_placement="post", final_norm=False)),
    ("gpt2", GPTConfig, dict(vocab_size=50257, max_positions=1024, norm_placement="pre", final_norm=True)),
    ("gpt2-xl", GPTConfig, dict(n_layer=48, dim=1600, n_head=25, ff_dim=6400)),
    ("gpt3-175b", GPTConfig, dict(n_layer=96, dim=12288, n_head=96, ff_dim=49152, max_positions=2048)),
    ("llama-7b", LlamaConfig, dict(n_layer=32, dim=4096, n_head=32, ff_dim=11008, tie_embeddings=False)),
    ("llama-13b", LlamaConfig, dict(n_layer=40, dim=5120, n_head=40, ff_dim=13824)),
])
def test_presets_carry_the_published_shapes(name, cls, fields):
    config = preset(name)
    assert type(config) is cls
    assert {k: getattr(config, k) for k in fields} == fields


@pytest.mark.parametrize("name", ["bert-tiny", "gpt-tiny", "llama-tiny"])
def test_tiny_presets_are_small(name):
    config = preset(name)
    assert 2 <= config.n_layer <= 4 and 128 <= config.dim <= 256


def test_llama_tiny_uses_grouped_query_attention():
    config = preset("llama-tiny")
    assert config.n_kv_head < config.n_head


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match="gpt5") as err:
        preset("gpt5")
    for name in ("bert-base", "gpt2-xl", "llama-7b", "gpt-tiny"):
        assert name in str(err.value)


def test_preset_overrides_apply_and_validate():
    assert preset("gpt2", position="rope").position == "rope"
    with pytest.raises(ValueError, match="unknown keys \\['n_embd'\\]"):
        preset("gpt2", n_embd=3)


@pytest.mark.parametrize("cls", FAMILIES)
def test_unknown_keys_are_rejected_with_the_valid_list(cls):
    with pytest.raises(ValueError) as err:
        cls.from_dict({"dim": 64, "hidden_size": 64})
    msg = str(err.value)
    assert "hidden_size" in msg and "'dim'" in msg and "'n_layer'" in msg


@pytest.mark.parametrize("cls", FAMILIES)
def test_every_field_has_a_one_line_help(cls):
    helps = describe(cls)
    assert set(helps) == {f.name for f in dataclasses.fields(cls)}
    assert all(text and "\n" not in text for text in helps.values())


@pytest.mark.parametrize("cls, bad, field_name", [
    (GPTConfig, dict(position="xpos"), "position"),
    (GPTConfig, dict(norm_placement="sandwich"), "norm_placement"),
    (BertConfig, dict(task="qa"), "task"),
    (GPTConfig, dict(dim=100, n_head=12), "n_head"),
    (LlamaConfig, dict(n_head=32, n_kv_head=5), "n_kv_head"),
    (BertConfig, dict(n_layer=0), "n_layer"),
    (GPTConfig, dict(dropout=1.5), "dropout"),
    (BertConfig, dict(task="pretraining", pooler=False), "pooler"),
])
def test_bad_values_name_the_field(cls, bad, field_name):
    with pytest.raises(ValueError, match=f"^{field_name}:"):
        cls(**bad)


def test_choices_are_listed_in_the_help():
    assert "alibi" in describe(GPTConfig)["position"] and "rope" in describe(GPTConfig)["position"]


def test_presets_are_plain_data():
    # a preset is a family name and field values, never a subclass
    for family, fields in PRESETS.values():
        assert isinstance(family, str) and isinstance(fields, dict)
    assert len(preset_names()) == len(PRESETS) >= 13


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(sorted(PRESETS)))
def test_dict_round_trip(name):
    config = preset(name)
    assert type(config).from_dict(config.to_dict()) == config
    assert config.replace(dropout=0.0).dropout == 0.0 and config.replace().to_dict() == config.to_dict()
