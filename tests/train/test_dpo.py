"""DPO: sequence log-probs, the loss family against trl's formulas (and trl itself), metrics, the objective
with a frozen reference, with adapters disabled, and with cached reference log-probs."""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from nanomm import peft
from nanomm.models import build, preset
from nanomm.train.dpo import (DPOConfig, LOSSES, ReferenceLogps, dpo_loss, dpo_metrics, dpo_objective,
                              precompute_reference_logps, sequence_logps)

VOCAB = 50


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    cfg = preset("llama-tiny", vocab_size=VOCAB, n_layer=2, dim=32, n_head=4, n_kv_head=2, ff_dim=64)
    return build(cfg).eval()


def pair_batch(B: int = 4, prompt: int = 3, seed: int = 0, index_from: int = 0):
    """B pairs: a shared prompt, then chosen / rejected responses of different lengths, right-padded."""
    g = torch.Generator().manual_seed(seed)
    T = prompt + 5
    ids = torch.zeros(2 * B, T, dtype=torch.long)
    labels = torch.full((2 * B, T), -100)
    mask = torch.zeros(2 * B, T, dtype=torch.long)
    for b in range(B):
        p = torch.randint(1, VOCAB, (prompt,), generator=g)
        for row, n in ((b, 2 + b % 3), (B + b, 5 - b % 2)):
            resp = torch.randint(1, VOCAB, (n,), generator=g)
            ids[row, :prompt + n] = torch.cat([p, resp])
            labels[row, prompt:prompt + n] = resp
            mask[row, :prompt + n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "index": torch.arange(B) + index_from}


# ----------------------------------------------------------------------------- sequence log-probs

@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_sequence_logps_equal_a_token_loop(reduction):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=g)
    labels = torch.randint(0, 11, (3, 6), generator=g)
    labels[:, :2] = -100  # prompt
    labels[1, 4:] = -100  # padding
    got = sequence_logps(logits, labels, reduction=reduction)
    for b in range(3):
        terms = [torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]] for t in range(1, 6) if labels[b, t] != -100]
        expected = sum(terms) / (len(terms) if reduction == "mean" else 1)
        torch.testing.assert_close(got[b], expected, atol=1e-6, rtol=1e-6)  # float32, ≤ 4 terms


@pytest.mark.parametrize("args, message", [
    (dict(logits=torch.zeros(2, 5), labels=torch.zeros(2, 5, dtype=torch.long)), r"logits: expected \(B, T, V\)"),
    (dict(logits=torch.zeros(2, 5, 3), labels=torch.zeros(2, 4, dtype=torch.long)),
     r"labels: expected \(B, T\) = \(2, 5\)"),
    (dict(logits=torch.zeros(2, 5, 3), labels=torch.zeros(2, 5, dtype=torch.long), reduction="max"),
     "reduction: expected"),
])
def test_sequence_logps_validation(args, message):
    with pytest.raises(ValueError, match=message):
        sequence_logps(**args)


# ----------------------------------------------------------------------------- the loss family

def trl_formula(loss, pc, pr, rc, rr, beta, eps, lc, lr):
    """Transcribed from trl's documented DPO losses (DPOTrainer, loss_type=...)."""
    logits = (pc - pr) - (rc - rr)  # pi_logratios - ref_logratios
    if loss == "sigmoid":
        return -F.logsigmoid(beta * logits)
    if loss == "hinge":
        return torch.relu(1 - beta * logits)
    if loss == "ipo":  # averaged over response tokens before the square
        return (((pc - rc) / lc - (pr - rr) / lr) - 1 / (2 * beta)) ** 2
    if loss == "robust":
        return (-F.logsigmoid(beta * logits) * (1 - eps) + F.logsigmoid(-beta * logits) * eps) / (1 - 2 * eps)
    raise KeyError(loss)


def random_logps(B=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 20, (2, B), generator=g).double()
    # summed log-probs of responses: negative, tens of nats, with chosen and rejected close to each other
    logps = [(-lengths[i % 2] * (1 + torch.rand(B, generator=g, dtype=torch.float64))).requires_grad_()
             for i in range(4)]
    return logps, lengths


@pytest.mark.parametrize("loss", ["sigmoid", "hinge", "ipo", "robust"])
@pytest.mark.parametrize("beta, eps", [(0.1, 0.0), (0.5, 0.2)])
def test_losses_and_gradients_equal_trl_formulas(loss, beta, eps):
    eps = eps if loss == "robust" else 0.0
    (pc, pr, rc, rr), (lc, lr) = random_logps()
    ours, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss=loss, label_smoothing=eps, chosen_lengths=lc,
                          rejected_lengths=lr)
    g_ours = torch.autograd.grad(ours, (pc, pr, rc, rr))
    theirs = trl_formula(loss, pc, pr, rc, rr, beta, eps, lc, lr).mean()
    g_theirs = torch.autograd.grad(theirs, (pc, pr, rc, rr))
    # float64 and the same operations up to association: agreement to ~1e-15, checked at 1e-12
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-12)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    assert any(float(g.abs().max()) > 0 for g in g_ours)


@pytest.mark.parametrize("loss, at_reference", [
    ("sigmoid", math.log(2)), ("robust", math.log(2)), ("cdpo", math.log(2)), ("hinge", 1.0), ("ipo", 25.0),
])
def test_loss_at_pi_equal_pi_ref(loss, at_reference):
    logps = torch.randn(8) - 30
    eps = 0.1 if loss in ("robust", "cdpo") else 0.0
    value, rc, rr = dpo_loss(logps, logps - 3, logps, logps - 3, beta=0.1, loss=loss, label_smoothing=eps)
    assert float(value) == pytest.approx(at_reference, abs=1e-6)  # ipo: (1/(2β))² = 25 at β = 0.1
    assert torch.count_nonzero(rc) == 0 and torch.count_nonzero(rr) == 0


def test_metrics_equal_trl_definitions():
    (pc, pr, rc, rr), _ = random_logps(seed=2)
    beta = 0.3
    _, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, beta=beta)
    m = dpo_metrics(chosen_r, rejected_r, pc, pr)
    c, r = beta * (pc - rc).detach(), beta * (pr - rr).detach()
    expected = {"rewards/chosen": c.mean(), "rewards/rejected": r.mean(), "rewards/margins": (c - r).mean(),
                "rewards/accuracies": (c > r).double().mean(), "logps/chosen": pc.mean(), "logps/rejected": pr.mean()}
    assert set(m) == set(expected)
    for k, v in expected.items():
        assert m[k] == pytest.approx(float(v.detach()), abs=1e-12), k
    assert 0 < m["rewards/accuracies"] < 1  # a real mix, so the test can tell > from >=


@pytest.mark.parametrize("kwargs, message", [
    (dict(beta=0.0), "beta: expected a finite number > 0"),
    (dict(loss="kto"), "loss: expected one of"),
    (dict(loss="robust", label_smoothing=0.5), r"label_smoothing: expected a number in \[0, 0.5\)"),
    (dict(loss="sigmoid", label_smoothing=0.1), "label_smoothing: only"),
])
def test_loss_validation(kwargs, message):
    x = torch.zeros(3)
    with pytest.raises(ValueError, match=message):
        dpo_loss(x, x, x, x, **kwargs)


# ----------------------------------------------------------------------------- against trl itself

def _trl_compute_loss(loss, beta, eps, per_token, completion_mask, ref_c, ref_r):
    """Run trl's DPOTrainer._compute_loss on a stand-in model whose per-token log-probs are given."""
    from trl.trainer.dpo_trainer import DPOTrainer

    def fake_model(**kwargs):
        n, t = per_token.shape
        zeros = torch.zeros(n, t)
        return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    fake_model.training = True
    acc = SimpleNamespace(device="cpu", gather=lambda x: x, gather_for_metrics=lambda x: x)
    stub = SimpleNamespace(model=fake_model, accelerator=acc, aux_loss_enabled=False, ld_alpha=None,
                           precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss],
                           loss_weights=[1.0], beta=beta, label_smoothing=eps, use_weighting=False,
                           _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    n = completion_mask.shape[0]
    inputs = {"input_ids": torch.zeros(n, completion_mask.shape[1], dtype=torch.long),
              "attention_mask": torch.ones_like(completion_mask), "completion_mask": completion_mask,
              "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    value = DPOTrainer._compute_loss(stub, fake_model, inputs, False)
    return value, {k: v[-1] for k, v in stub._metrics["train"].items()}


@pytest.mark.parametrize("loss, eps", [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.25)])
def test_equal_to_trl_dpo_trainer(loss, eps):
    trl = pytest.importorskip("trl")
    if int(trl.__version__.split(".")[0]) != 1:
        pytest.skip(f"the stand-in model follows trl 1.x internals, found trl {trl.__version__}")
    B, T, beta = 4, 7, 0.2
    g = torch.Generator().manual_seed(0)
    completion = torch.zeros(2 * B, T, dtype=torch.long)
    for row in range(2 * B):
        completion[row, 2:2 + 2 + row % 4] = 1  # prompt of 2, responses of 2..5 tokens
    per_token = (-3 * torch.rand(2 * B, T - 1, generator=g) * completion[:, 1:]).requires_grad_()
    ref = -3 * torch.rand(2, B, generator=g) * completion[:, 1:].sum(-1).view(2, B)
    theirs, trl_metrics = _trl_compute_loss(loss, beta, eps, per_token, completion, ref[0], ref[1])
    (g_theirs,) = torch.autograd.grad(theirs, per_token)

    logps = per_token.sum(-1)
    lengths = completion.sum(-1)
    ours, chosen_r, rejected_r = dpo_loss(logps[:B], logps[B:], ref[0], ref[1], beta=beta, loss=loss,
                                          label_smoothing=eps, chosen_lengths=lengths[:B], rejected_lengths=lengths[B:])
    (g_ours,) = torch.autograd.grad(ours, per_token)
    # float32, the same operations: a few ulps of values of size ~1
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g_ours, g_theirs, atol=1e-6, rtol=1e-6)
    ours_metrics = dpo_metrics(chosen_r, rejected_r, logps[:B], logps[B:])
    for key, value in ours_metrics.items():
        assert value == pytest.approx(trl_metrics[key], abs=1e-6), key


# ----------------------------------------------------------------------------- the objective

def test_objective_with_a_frozen_copy_starts_at_log2_and_trains():
    policy = tiny_llama()
    objective = dpo_objective(policy, copy.deepcopy(policy), config=DPOConfig(beta=0.1))
    batch = pair_batch()
    loss, metrics = objective(policy, batch)
    assert float(loss.detach()) == pytest.approx(math.log(2), abs=1e-6)  # π = π_ref exactly: identical weights
    assert metrics["rewards/chosen"] == 0.0 and metrics["rewards/margins"] == 0.0
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    for _ in range(12):
        opt.zero_grad()
        loss, metrics = objective(policy, batch)
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * math.log(2) and metrics["rewards/accuracies"] == 1.0


def test_disabled_adapters_are_the_reference():
    policy, base = tiny_llama(), tiny_llama()
    peft.apply(policy, peft.LoraConfig(r=4, target_modules="all-linear"))
    objective = dpo_objective(policy, None)
    batch = pair_batch()
    loss, _ = objective(policy, batch)
    assert float(loss.detach()) == pytest.approx(math.log(2), abs=1e-6)  # B = 0: the adapted model is its base
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if n.endswith("lora_B.weight"):
                p.normal_(0, 0.1)
    loss, metrics = objective(policy, batch)
    assert abs(float(loss.detach()) - math.log(2)) > 1e-3
    # the reference was the base model: same rewards as with an explicit copy of it
    _, explicit = dpo_objective(policy, base)(policy, batch)
    for k in metrics:
        assert metrics[k] == pytest.approx(explicit[k], abs=1e-5), k  # float32 logits, sums over ≤ 5 tokens
    loss.backward()
    assert all((p.grad is not None) == (".lora_" in n) for n, p in policy.named_parameters())


def test_objective_argument_errors():
    policy = tiny_llama()
    with pytest.raises(ValueError, match="reference: None means"):
        dpo_objective(policy, None)
    with pytest.raises(ValueError, match="got the policy itself"):
        dpo_objective(policy, policy)
    with pytest.raises(ValueError, match=r"batch: expected input_ids and labels \(2B, T\)"):
        dpo_objective(policy, tiny_llama())(policy, {"input_ids": torch.zeros(3, 4, dtype=torch.long),
                                                     "labels": torch.zeros(3, 4, dtype=torch.long)})
    with pytest.raises(ValueError, match=r"DPOConfig: unknown keys \['temperature'\]"):
        DPOConfig.from_dict({"temperature": 0.1})


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_reference_logps_cached_on_disk(tmp_path, reduction):
    policy = tiny_llama()
    peft.apply(policy, peft.LoraConfig())
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if n.endswith("lora_B.weight"):
                p.normal_(0, 0.1)
    batches = [pair_batch(seed=s, index_from=4 * s) for s in range(2)]
    path = tmp_path / "ref_logps.safetensors"
    precompute_reference_logps(policy, batches, path, reduction=reduction, disable_adapters=True)
    cache = ReferenceLogps.load(path)
    config = DPOConfig(reduction=reduction)
    cached = dpo_objective(policy, None, config=config, reference_logps=cache)
    live = dpo_objective(policy, None, config=config)
    for batch in reversed(batches):  # looked up by index, not by order
        (a, ma), (b, mb) = cached(policy, batch), live(policy, batch)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        assert ma == pytest.approx(mb, abs=1e-6)  # the same forward, once now and once before
    with pytest.raises(KeyError, match="no cached reference"):
        cached(policy, pair_batch(index_from=100))
    other = "mean" if reduction == "sum" else "sum"
    with pytest.raises(ValueError, match="reference_logps: computed with reduction"):
        dpo_objective(policy, None, config=DPOConfig(reduction=other), reference_logps=cache)


def test_losses_table_names():
    assert set(LOSSES) == {"sigmoid", "hinge", "ipo", "robust", "cdpo"}


def test_runs_in_the_shared_trainer(tmp_path):
    from nanomm.train.trainer import TrainConfig, Trainer

    class Pairs:  # an endless source of one batch, resumable
        def __next__(self):
            return pair_batch()

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    policy = tiny_llama()
    peft.apply(policy, peft.LoraConfig(r=4, target_modules="all-linear"))
    cfg = TrainConfig(steps=4, lr=1e-2, warmup_steps=0, eval_every=0, save_every=0, log_every=1)
    history = Trainer(policy, dpo_objective(policy, None), Pairs(), cfg, tmp_path).fit()
    assert [row["step"] for row in history] == [1, 2, 3, 4]
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # LoRA's B = 0: π = π_ref at step 1
    assert history[-1]["rewards/margins"] > 0 and history[-1]["loss"] < math.log(2)
