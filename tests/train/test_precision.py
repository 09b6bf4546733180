"""nanomm.train.precision and loss_scale: underflow without scaling, fp16+scaling ≈ fp32, the scale
trajectory of torch.amp.GradScaler, skipped steps, DeepSpeed's hysteresis and floor, exact resume."""

import copy
import json
import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.overrides import TorchFunctionMode

from nanomm.train.loss_scale import DynamicLossScaler, StaticLossScaler, from_deepspeed, make_scaler
from nanomm.train.precision import (FP32_POLICY, PRECISIONS, Fp32Policy, MixedPrecision, float_format,
                                    underflow_fraction)

N, D, H, C = 256, 32, 16, 2
TINY = 2.0**-18  # loss weight: gradients near 1e-8 (median 1.7e-8), the tail fp16 flushes (Micikevicius Fig. 3)
LR = 0.5 / TINY  # SGD undoes the weight, so in exact arithmetic the run is plain training at lr 0.5


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g)
    return x, (x @ torch.randn(D, C, generator=g)).argmax(1)


def _model(seed=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, H), nn.LayerNorm(H), nn.GELU(), nn.Linear(H, C))


def _loss(mp, x, y):
    with mp.autocast():
        return F.cross_entropy(mp.model(x.to(mp.dtype)), y)


def _train(precision, loss_scale, steps=40, optimizer=lambda ps: torch.optim.SGD(ps, lr=LR), inf_at=()):
    x, y = _data()
    mp = MixedPrecision(_model(), precision, loss_scale=loss_scale)
    opt = optimizer(mp.parameters())
    losses, scales, taken = [], [], []
    for step in range(steps):
        loss = _loss(mp, x, y)
        losses.append(loss.item())
        mp.backward(loss * TINY)
        if step in inf_at:
            next(mp.model.parameters()).grad[0, 0] = float("inf")
        taken.append(mp.step(opt))
        scales.append(mp.scale)
    return losses, scales, taken, mp, opt


# ---------------------------------------------------------------------------------------- formats

@pytest.mark.parametrize("name, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_float_format_from_bits_matches_torch(name, dtype):
    f, fi = float_format(name), torch.finfo(dtype)
    assert (f.max, f.min_normal, f.eps) == (fi.max, fi.smallest_normal, fi.eps)
    assert f.mantissa_bits == fi.bits - 1 - f.exponent_bits
    # the smallest subnormal survives a round trip; half of it rounds (to even) to zero
    assert torch.tensor(f.min_subnormal, dtype=dtype).item() == f.min_subnormal
    assert torch.tensor(f.min_subnormal / 2, dtype=dtype).item() == 0.0


# ---------------------------------------------------------------------------------------- underflow

@pytest.mark.parametrize("precision, loss_scale, low, high", [
    ("fp16", 1.0, 0.9, 1.0),          # unscaled fp16: (almost) every gradient entry flushes to 0
    ("fp16", "dynamic", 0.0, 0.01),   # ×2^16 lifts them into fp16's range
    ("fp16", 2.0**24, 0.0, 0.01),
    ("bf16", None, 0.0, 0.01),        # bf16 has fp32's exponent range: nothing to rescue
])
def test_gradients_underflow_in_fp16_without_scaling(precision, loss_scale, low, high):
    x, y = _data()
    ref = _model()
    (F.cross_entropy(ref(x), y) * TINY).backward()
    ref_grads = [p.grad for p in ref.parameters()]
    assert 1e-9 < torch.cat([g.abs().flatten() for g in ref_grads]).median() < 1e-7  # the regime under test
    mp = MixedPrecision(_model(), precision, loss_scale=loss_scale)
    mp.backward(_loss(mp, x, y) * TINY)
    assert not mp.unscale_()
    frac = underflow_fraction([m.grad for m in mp.parameters()], ref_grads)
    assert low <= frac <= high


# fp16 rounds each of the ~6 chained forward ops to u = 2^-11 ≈ 4.9e-4 relative, bf16 to 2^-8 ≈ 3.9e-3;
# with loss ≤ 0.72 the per-step loss error is a few u·loss: 2e-3 (fp16) and 1.5e-2 (bf16) bound it.
# (Measured: 6.5e-5 and 3.6e-4.) The unscaled fp16 run misses fp32 by 0.70, far outside both.
@pytest.mark.parametrize("precision, loss_scale, tol", [
    ("fp16", 2.0**24, 2e-3),
    ("fp16", "dynamic", 2e-3),
    ("bf16", None, 1.5e-2),
])
def test_scaled_low_precision_training_matches_fp32(precision, loss_scale, tol):
    ref, *_ = _train("fp32", None)
    got, *_ = _train(precision, loss_scale)
    assert ref[-1] < 0.1 * ref[0]  # the reference does learn
    assert max(abs(a - b) for a, b in zip(got, ref)) < tol


def test_unscaled_fp16_does_not_train():
    ref, *_ = _train("fp32", None, steps=10)
    got, *_ = _train("fp16", 1.0, steps=10)
    assert max(got) - min(got) < 1e-3  # every gradient was 0: the weights never moved
    assert got[-1] - ref[-1] > 0.3


# ---------------------------------------------------------------------------------------- vs GradScaler

def _torch_scales(found_inf, init_scale, growth_interval, growth=2.0, backoff=0.5):
    """torch.amp.GradScaler's scale after each step, with inf injected into the gradient at `found_inf`."""
    p = nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    sc = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_factor=growth, backoff_factor=backoff,
                              growth_interval=growth_interval)
    out = []
    for bad in found_inf:
        opt.zero_grad()
        sc.scale(p.sum()).backward()
        if bad:
            p.grad[1] = float("inf")
        sc.step(opt)
        sc.update()
        out.append(sc.get_scale())
    return out


@pytest.mark.parametrize("inf_at", [(), (0,), (0, 1, 2), (4, 5, 11), (3, 7, 8, 9, 15)])
def test_scale_trajectory_equals_grad_scaler(inf_at):
    steps = 18
    _, scales, taken, *_ = _train("fp16", DynamicLossScaler(2.0**10, growth_interval=3), steps=steps, inf_at=inf_at)
    assert scales == _torch_scales([s in inf_at for s in range(steps)], 2.0**10, 3)
    assert taken == [s not in inf_at for s in range(steps)]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.booleans(), max_size=30), st.integers(0, 24), st.integers(1, 5),
       st.sampled_from([(2.0, 0.5), (4.0, 0.25), (2.0, 0.125)]))
def test_scaler_equals_grad_scaler_on_any_overflow_sequence(found_inf, power, interval, factors):
    ours = DynamicLossScaler(2.0**power, growth_interval=interval, growth_factor=factors[0], backoff_factor=factors[1])
    scales = []
    for bad in found_inf:
        ours.update(bad)
        scales.append(ours.scale)
    assert scales == _torch_scales(found_inf, 2.0**power, interval, *factors)


def test_fp32_mode_with_dynamic_scaling_is_grad_scaler_exactly():
    """Same weights as torch's GradScaler loop, bit for bit, AdamW and injected overflows included."""
    inf_at, steps = (2, 3, 9), 14
    adamw = lambda ps: torch.optim.AdamW(ps, lr=1e-2)  # noqa: E731
    _, scales, _, mp, _ = _train("fp32", DynamicLossScaler(2.0**8, growth_interval=4), steps, adamw, inf_at)
    x, y = _data()
    model = _model()
    opt = adamw(model.parameters())
    sc = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=4)
    ref_scales = []
    for step in range(steps):
        opt.zero_grad()
        sc.scale(F.cross_entropy(model(x), y) * TINY).backward()
        if step in inf_at:
            next(model.parameters()).grad[0, 0] = float("inf")
        sc.step(opt)
        sc.update()
        ref_scales.append(sc.get_scale())
    assert scales == ref_scales
    assert all(torch.equal(a, b) for a, b in zip(mp.parameters(), model.parameters()))


# ---------------------------------------------------------------------------------------- skipped steps

@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_skipped_step_leaves_weights_and_adamw_state_untouched(bad):
    x, y = _data()
    mp = MixedPrecision(_model(), "fp16", loss_scale=DynamicLossScaler(2.0**12))
    opt = torch.optim.AdamW(mp.parameters(), lr=1e-2)
    for _ in range(3):
        mp.backward(_loss(mp, x, y) * TINY)
        assert mp.step(opt)
    masters = [p.detach().clone() for p in mp.parameters()]
    work = [p.detach().clone() for p in mp.model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    mp.backward(_loss(mp, x, y) * TINY)
    list(mp.model.parameters())[-1].grad[0] = bad
    assert mp.step(opt) is False
    assert mp.scale == 2.0**11
    assert all(torch.equal(a, b) for a, b in zip(masters, mp.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(work, mp.model.parameters()))
    after = opt.state_dict()["state"]
    assert sorted(after) == sorted(state["state"])
    for k, s in state["state"].items():
        assert set(s) == {"step", "exp_avg", "exp_avg_sq"}
        assert all(torch.equal(s[n], after[k][n]) for n in s)
    assert all(p.grad is None for p in (*mp.parameters(), *mp.model.parameters()))


def test_working_copy_is_the_rounded_master_after_each_step():
    *_, mp, _ = _train("fp16", "dynamic", steps=5)
    assert all(torch.equal(w, m.to(torch.float16)) for w, m in zip(mp.model.parameters(), mp.parameters()))
    assert all(m.dtype == torch.float32 for m in mp.parameters())


def test_unscale_is_idempotent_and_gives_true_fp32_gradients():
    x, y = _data()
    ref = _model()
    F.cross_entropy(ref(x), y).backward()
    mp = MixedPrecision(_model(), "fp16", loss_scale=2.0**8)
    mp.backward(_loss(mp, x, y))
    mp.unscale_()
    first = [p.grad.clone() for p in mp.parameters()]
    mp.unscale_()
    assert all(torch.equal(a, p.grad) for a, p in zip(first, mp.parameters()))
    # fp16 forward and backward: relative error a few × 2^-11 on gradients of size ~1e-2
    for g, r in zip(first, ref.parameters()):
        torch.testing.assert_close(g, r.grad, rtol=2e-2, atol=2e-4)


# ---------------------------------------------------------------------------------------- DeepSpeed options

# (scaler kwargs, overflow sequence, scale after each step): DeepSpeed DynamicLossScaler's documented rules
HYSTERESIS = [
    (dict(hysteresis=2), [1, 1, 1, 0, 1], [16, 8, 4, 4, 2]),  # budget 2, not refilled by clean steps
    (dict(hysteresis=2), [1, 0, 1, 0, 1], [16, 16, 8, 8, 4]),
    (dict(hysteresis=2, consecutive_hysteresis=True), [1, 0, 1, 0, 1], [16] * 5),  # refilled each clean step
    (dict(hysteresis=2, consecutive_hysteresis=True), [1, 1, 0, 1, 1], [16, 8, 8, 8, 4]),
    (dict(hysteresis=2, growth_interval=2), [1, 0, 0, 1, 1], [16, 16, 32, 32, 16]),  # growth refills it
    (dict(hysteresis=3), [1, 1, 1, 1], [16, 16, 8, 4]),
    (dict(min_scale=4.0), [1, 1, 1, 1, 0], [8, 4, 4, 4, 4]),  # the floor; overflows still skip
    (dict(min_scale=3.0), [1, 1, 1], [8, 4, 3]),
    (dict(min_scale=1.0, growth_interval=1), [1, 1, 1, 1, 0, 1], [8, 4, 2, 1, 2, 1]),
]


@pytest.mark.parametrize("kwargs, overflows, expected", HYSTERESIS)
def test_hysteresis_and_min_scale_follow_deepspeed(kwargs, overflows, expected):
    s = DynamicLossScaler(16.0, **{"growth_interval": 100, **kwargs})
    got = []
    for bad in overflows:
        s.update(bool(bad))
        got.append(s.scale)
    assert got == expected


def test_raise_at_min_scale_stops_a_diverging_run():
    s = DynamicLossScaler(2.0, min_scale=1.0, raise_at_min_scale=True)
    s.update(True)
    assert s.scale == 1.0
    with pytest.raises(FloatingPointError, match="min_scale=1"):
        s.update(True)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.booleans(), max_size=25), st.integers(1, 3), st.booleans(), st.sampled_from([0.5, 1.0, 4.0]))
def test_hysteresis_equals_deepspeed_dynamic_loss_scaler(overflows, hysteresis, consecutive, min_scale):
    ds = pytest.importorskip("deepspeed.runtime.fp16.loss_scaler")
    # a window longer than the run: DeepSpeed grows one clean step later than torch (tested below)
    theirs = ds.DynamicLossScaler(init_scale=64.0, scale_window=1000, min_scale=min_scale,
                                  delayed_shift=hysteresis, consecutive_hysteresis=consecutive,
                                  raise_error_at_min_scale=False)
    ours = DynamicLossScaler(64.0, growth_interval=1000, hysteresis=hysteresis,
                             consecutive_hysteresis=consecutive, min_scale=min_scale)
    with mock.patch.object(ds.dist, "get_rank", lambda: 0):  # only for its log lines; no process group here
        for bad in overflows:
            theirs.update_scale(bad)
            ours.update(bad)
            assert ours.scale == theirs.cur_scale


def test_deepspeed_grows_on_the_window_plus_first_clean_step():
    """The one documented difference (loss_scale.py): DeepSpeed's first growth comes a step later."""
    ds = pytest.importorskip("deepspeed.runtime.fp16.loss_scaler")
    theirs = ds.DynamicLossScaler(init_scale=16.0, scale_window=3, min_scale=1,
                                  delayed_shift=1, consecutive_hysteresis=False)
    ours = DynamicLossScaler(16.0, growth_interval=3)
    got = []
    with mock.patch.object(ds.dist, "get_rank", lambda: 0):
        for _ in range(4):
            theirs.update_scale(False)
            ours.update(False)
            got.append((ours.scale, theirs.cur_scale))
    assert got == [(16, 16), (16, 16), (32, 16), (32, 32)]


def test_deepspeed_fp16_config_maps_to_the_scaler():
    s = from_deepspeed({"enabled": True, "loss_scale": 0, "initial_scale_power": 12, "loss_scale_window": 500,
                        "hysteresis": 3, "consecutive_hysteresis": True, "min_loss_scale": 2})
    assert (s.scale, s.growth_interval, s.hysteresis, s.consecutive_hysteresis, s.min_scale) == (4096, 500, 3, True, 2)
    assert (s.growth_factor, s.backoff_factor) == (2.0, 0.5)
    d = from_deepspeed({})  # DeepSpeed's defaults
    assert (d.scale, d.growth_interval, d.hysteresis, d.min_scale) == (2.0**16, 1000, 2, 1.0)
    assert isinstance(from_deepspeed({"loss_scale": 128}), StaticLossScaler)
    assert from_deepspeed({"loss_scale": 128}).scale == 128.0


# ---------------------------------------------------------------------------------------- bad config

@pytest.mark.parametrize("make, error, match", [
    (lambda: StaticLossScaler(-2.0), ValueError, r"loss_scale: expected a finite number > 0, got -2.0"),
    (lambda: StaticLossScaler(0), ValueError, r"loss_scale: expected a finite number > 0, got 0"),
    (lambda: make_scaler(float("nan")), ValueError, r"loss_scale: expected a finite number > 0, got nan"),
    (lambda: DynamicLossScaler(-1.0), ValueError, r"init_scale: expected a finite number > 0, got -1.0"),
    (lambda: DynamicLossScaler(growth_factor=1.0), ValueError, r"growth_factor: expected a number > 1"),
    (lambda: DynamicLossScaler(backoff_factor=1.5), ValueError, r"backoff_factor: expected a number in \(0, 1\)"),
    (lambda: DynamicLossScaler(growth_interval=0), ValueError, r"growth_interval: expected an int >= 1, got 0"),
    (lambda: DynamicLossScaler(hysteresis=0), ValueError, r"hysteresis: expected an int >= 1, got 0"),
    (lambda: DynamicLossScaler(8.0, min_scale=16.0), ValueError, r"min_scale: expected a number in \[0, init"),
    (lambda: make_scaler("auto"), ValueError, r"loss_scale: expected one of \['dynamic', 'static'\]"),
    (lambda: make_scaler(True), TypeError, r"loss_scale: expected None, a number"),
    (lambda: from_deepspeed({"loss_scale": -1}), ValueError, r"fp16\['loss_scale'\]: expected 0 \(dynamic\)"),
    (lambda: from_deepspeed({"loss_scal": 0}), ValueError, r"fp16: unknown keys \['loss_scal'\]"),
    (lambda: from_deepspeed({"initial_scale_power": 1.5}), ValueError, r"initial_scale_power'\]: expected an int"),
    (lambda: MixedPrecision(_model(), "fp8"), ValueError, r"precision: expected one of \['bf16', 'fp16', 'fp32'\]"),
    (lambda: MixedPrecision(_model(), "fp16", loss_scale=-4), ValueError, r"loss_scale: expected a finite number"),
    (lambda: MixedPrecision("model"), TypeError, r"model: expected a torch.nn.Module, got str"),
    (lambda: float_format("fp8"), ValueError, r"name: expected one of"),
    (lambda: MixedPrecision(_model()).backward(torch.ones(2, requires_grad=True)), ValueError,
     r"loss: expected a scalar that requires grad, got shape \(2,\) with requires_grad=True"),
    (lambda: MixedPrecision(_model()).backward(1.0), TypeError, r"loss: expected a torch.Tensor, got float"),
    (lambda: Fp32Policy(torch.float32), ValueError, r"low: expected torch.float16 or torch.bfloat16"),
])
def test_bad_configuration_raises_a_clear_error(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_optimizer_over_the_working_copy_is_rejected():
    x, y = _data()
    mp = MixedPrecision(_model(), "fp16")
    opt = torch.optim.SGD(mp.model.parameters(), lr=0.1)  # the classic mistake: fp16 weights, not masters
    mp.backward(_loss(mp, x, y))
    with pytest.raises(ValueError, match=r"optimizer: expected it to be built over mp.parameters\(\)"):
        mp.step(opt)


# ---------------------------------------------------------------------------------------- state and resume

@settings(max_examples=30, deadline=None)
@given(st.lists(st.booleans(), max_size=20), st.lists(st.booleans(), min_size=1, max_size=20),
       st.integers(1, 4), st.integers(1, 3), st.booleans())
def test_scaler_state_dict_round_trips_through_json(before, after, interval, hysteresis, consecutive):
    a = DynamicLossScaler(2.0**10, growth_interval=interval, hysteresis=hysteresis,
                          consecutive_hysteresis=consecutive, min_scale=0.25)
    for bad in before:
        a.update(bad)
    b = DynamicLossScaler()
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for bad in after:
        a.update(bad)
        b.update(bad)
        assert a.state_dict() == b.state_dict()


def test_scaler_rejects_a_state_of_the_other_kind():
    with pytest.raises(ValueError, match="expected the state_dict of a dynamic loss scaler, got kind 'static'"):
        DynamicLossScaler().load_state_dict(StaticLossScaler(8).state_dict())


@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
def test_resume_from_state_dicts_is_exact(precision):
    x, y = _data()
    adamw = lambda ps: torch.optim.AdamW(ps, lr=1e-2)  # noqa: E731
    scaler = lambda: DynamicLossScaler(2.0**12, growth_interval=2)  # noqa: E731

    def steps(mp, opt, n, inf_at=()):
        out = []
        for i in range(n):
            loss = _loss(mp, x, y)
            out.append(loss.item())
            mp.backward(loss * TINY)
            if i in inf_at:
                next(mp.model.parameters()).grad.view(-1)[0] = float("nan")
            mp.step(opt)
        return out

    mp = MixedPrecision(_model(), precision, loss_scale=scaler())
    opt = adamw(mp.parameters())
    steps(mp, opt, 4, inf_at=(1,))
    saved = copy.deepcopy((mp.state_dict(), opt.state_dict(), mp.model.state_dict()))
    expected = steps(mp, opt, 5, inf_at=(2,))

    mp2 = MixedPrecision(_model(seed=7), precision, loss_scale=3.0)  # other weights, other scaler: all replaced
    opt2 = adamw(mp2.parameters())
    mp2.model.load_state_dict(saved[2])  # the checkpoint's working weights (the masters, in fp32 mode)
    mp2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    assert steps(mp2, opt2, 5, inf_at=(2,)) == expected
    assert mp2.scaler.state_dict() == mp.scaler.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(mp.parameters(), mp2.parameters()))


def test_state_dict_masters_only_when_separate():
    assert MixedPrecision(_model(), "fp32").state_dict()["masters"] == {}
    masters = MixedPrecision(_model(), "bf16").state_dict()["masters"]
    assert sorted(masters) == sorted(n for n, _ in _model().named_parameters())
    assert all(t.dtype == torch.float32 for t in masters.values())


def test_load_state_dict_checks_precision_and_names():
    mp = MixedPrecision(_model(), "fp16")
    with pytest.raises(ValueError, match=r"state\['precision'\]: expected 'fp16'"):
        mp.load_state_dict(MixedPrecision(_model(), "bf16").state_dict())
    bad = mp.state_dict()
    bad["masters"]["0.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"state\['masters'\]\['0.weight'\]: expected shape \(16, 32\)"):
        mp.load_state_dict(bad)


# ---------------------------------------------------------------------------------------- fp32 policy

def _x16(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).half().requires_grad_()


# op -> a call with fp16 tensors
CALLS = {
    "softmax": lambda: F.softmax(_x16(4, 8), -1),
    "log_softmax": lambda: _x16(4, 8).log_softmax(-1),
    "layer_norm": lambda: F.layer_norm(_x16(4, 8), (8,), torch.ones(8).half(), torch.zeros(8).half()),
    "rms_norm": lambda: torch.rms_norm(_x16(4, 8), (8,)),
    "group_norm": lambda: F.group_norm(_x16(4, 8), 2),
    "cross_entropy": lambda: F.cross_entropy(_x16(4, 8), torch.tensor([1, 2, 3, 4])),
    "nll_loss": lambda: F.nll_loss(_x16(4, 8), torch.tensor([1, 2, 3, 4])),
    "binary_cross_entropy_with_logits": lambda: F.binary_cross_entropy_with_logits(_x16(4, 8), torch.ones(4, 8).half()),
    "mse_loss": lambda: F.mse_loss(_x16(4, 8), torch.zeros(4, 8).half()),
    "kl_div": lambda: F.kl_div(_x16(4, 8), torch.full((4, 8), 0.125).half(), reduction="batchmean"),
}


def test_every_policy_op_has_a_test_call():
    assert sorted(CALLS) == sorted(FP32_POLICY)


class _Spy(TorchFunctionMode):
    """Records the floating dtypes each call receives; pushed outside Fp32Policy, it sees the policy's call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.calls.append((func, [t.dtype for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)
                                  and t.is_floating_point()]))
        return func(*args, **kwargs)


@pytest.mark.parametrize("op", sorted(FP32_POLICY))
def test_policy_computes_listed_ops_in_fp32(op):
    fns, rule, _ = FP32_POLICY[op]
    with _Spy() as spy, Fp32Policy(torch.float16):
        out = CALLS[op]()
    assert out.dtype == {"input": torch.float16, "fp32": torch.float32}[rule]
    reached = [dtypes for fn, dtypes in spy.calls if any(fn is f for f in fns)]
    assert reached and all(d == torch.float32 for d in reached[-1])  # the op itself ran on fp32 tensors
    without = CALLS[op]()
    assert without.dtype == torch.float16  # torch alone keeps the 16-bit dtype on CPU
    # same value: torch's CPU kernels also accumulate half inputs in fp32 (2 fp16 ulps of slack)
    torch.testing.assert_close(out.float(), without.float(), rtol=2e-3, atol=2e-3)


def test_policy_leaves_matmuls_in_16_bit_and_is_off_outside():
    lin = nn.Linear(8, 8).half()
    with Fp32Policy(torch.float16):
        assert lin(_x16(2, 8)).dtype == torch.float16
        assert F.softmax(torch.randn(2, 8), -1).dtype == torch.float32  # fp32 inputs pass through untouched
    assert F.cross_entropy(_x16(4, 8), torch.tensor([1, 2, 3, 4])).dtype == torch.float16


def test_precision_table():
    assert {k: (p.dtype, p.scaler, p.master_weights) for k, p in PRECISIONS.items()} == {
        "fp32": (torch.float32, "static", False),
        "bf16": (torch.bfloat16, "static", True),
        "fp16": (torch.float16, "dynamic", True),
    }
    mp = MixedPrecision(_model(), "fp16")
    assert mp.scale == 2.0**16 and mp.scaler.growth_interval == 2000 and mp.scaler.backoff_factor == 0.5
    assert all(p.dtype == torch.float16 for p in mp.model.parameters())
    assert math.isclose(MixedPrecision(_model(), "bf16").scale, 1.0)
