"""PEFT configs: help on every field, unknown keys and bad values rejected with the argument named."""

from __future__ import annotations

import dataclasses
import math

import pytest

from nanomm.peft import AdapterConfig, IA3Config, LoraConfig, PrefixConfig, config_from_dict, describe

CLASSES = [LoraConfig, PrefixConfig, AdapterConfig, IA3Config]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_field_has_help(cls):
    helps = describe(cls)
    assert set(helps) == {f.name for f in dataclasses.fields(cls)}
    assert all(len(text) > 10 for text in helps.values())


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_unknown_keys_are_rejected_with_the_valid_ones(cls):
    with pytest.raises(ValueError, match=r"unknown keys \['lora_rank'\]; valid keys are \[") as e:
        cls.from_dict({"lora_rank": 4})
    assert all(f.name in str(e.value) for f in dataclasses.fields(cls))


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_round_trip_through_a_dict(cls):
    config = cls()
    assert config_from_dict(config.to_dict()) == config


BAD = [
    (LoraConfig, dict(r=0), "r: expected a positive int"),
    (LoraConfig, dict(r=True), "r: expected a positive int"),
    (LoraConfig, dict(dropout=1.0), r"dropout: expected a probability in \[0, 1\)"),
    (LoraConfig, dict(alpha=math.nan), "alpha: expected a finite number"),
    (LoraConfig, dict(target_modules=[]), "target_modules: expected a regex string"),
    (LoraConfig, dict(exclude_modules=[""]), "exclude_modules: expected a regex string"),
    (PrefixConfig, dict(num_virtual_tokens=0), "num_virtual_tokens: expected a positive int"),
    (PrefixConfig, dict(projection_hidden=-3), "projection_hidden: expected a positive int"),
    (AdapterConfig, dict(activation="tanh"), r"activation: expected one of \['gelu'"),
    (AdapterConfig, dict(bottleneck=0), "bottleneck: expected a positive int"),
    (IA3Config, dict(feedforward_modules=5), "feedforward_modules: expected a regex string"),
]


@pytest.mark.parametrize("cls, kwargs, message", BAD, ids=[f"{c.__name__}-{list(k)[0]}" for c, k, _ in BAD])
def test_bad_values_name_the_field(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


@pytest.mark.parametrize("r, alpha, rslora, scaling",
                         [(8, 16.0, False, 2.0), (16, 16.0, True, 4.0), (4, 1.0, False, 0.25)])
def test_lora_scaling(r, alpha, rslora, scaling):
    assert LoraConfig(r=r, alpha=alpha, use_rslora=rslora).scaling == scaling


def test_config_from_dict_needs_a_known_method():
    with pytest.raises(ValueError, match="'method' one of"):
        config_from_dict({"method": "dora"})
