"""The ZeRO memory model against the ZeRO paper's own figures (Rajbhandari et al. 2020, §5 and Fig. 1)."""

import math

import pytest

from nanomm.train.memory import GB, activations, limit_reduction, lora_params, model_states, reduction

PSI = 7.5e9  # the paper's example model


@pytest.mark.parametrize("stage,paper_gb", [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_zero_paper_example_7_5b_on_64_devices(stage, paper_gb):
    got = model_states(int(PSI), stage=stage, n_devices=64).total / GB
    assert round(got, 1) == paper_gb  # the paper rounds to one decimal


@pytest.mark.parametrize("stage,n_devices,want", [(1, 8, 2.91), (2, 8, 4.27), (1, 64, 3.82), (2, 64, 7.21), (3, 64, 64.0)])
def test_reduction_factors(stage, n_devices, want):
    assert round(reduction(stage, n_devices), 2) == want


def test_four_and_eight_are_only_the_limits():
    assert limit_reduction(1) == 4.0 and limit_reduction(2) == 8.0 and math.isinf(limit_reduction(3))
    assert reduction(1, 10**6) == pytest.approx(4.0, rel=1e-4)
    # the notes' own accounting (fp32 weights 4 B, grads 4 B, Adam 8 B) would give 2x and 4x
    assert limit_reduction(1, "fp32") == 2.0 and limit_reduction(2, "fp32") == 4.0


def test_sixteen_bytes_per_parameter_either_way():
    for precision in ("mixed", "fp32"):
        assert model_states(10**10, precision=precision).total == 160e9  # the notes' "10B x 16 B = 160 GB"


def test_lora_freezes_most_state():
    n, t = 1_000_000, 10_000
    est = model_states(n, trainable=t)
    assert est.items == {"weights": 2 * n, "gradients": 2 * t, "optimizer": 12 * t}
    # LLaMA-7B shapes, LoRA r=8 on q and v: 32 layers x 2 x 8 x (4096 + 4096), as peft counts it
    shapes = {"q_proj": (4096, 4096), "v_proj": (4096, 4096)}
    assert lora_params(32, shapes, ["q_proj", "v_proj"], 8) == 4_194_304


def test_activation_modes_are_ordered():
    kw = dict(seq_len=2048, micro_batch=1)
    naive, flash, ckpt = (activations(32, 4096, 32, mode=m, **kw) for m in ("naive", "flash", "checkpoint"))
    assert naive > flash > ckpt
    assert flash == 32 * 34 * 2048 * 4096 and ckpt == 32 * 2 * 2048 * 4096


@pytest.mark.parametrize("kwargs,message", [
    (dict(stage=4), "stage: expected one of [0, 1, 2, 3]"),
    (dict(n_devices=0), "n_devices: expected an integer >= 1, got 0"),
    (dict(precision="fp8"), "precision: expected one of"),
    (dict(trainable=2), "trainable: expected between 0 and n_params=1"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        model_states(1, **kwargs)
