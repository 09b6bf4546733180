"""The shared training loop: accumulation is exact, resume is exact, a kill during save corrupts nothing."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from nanomm.train.checkpoint import latest_checkpoint, load_checkpoint
from nanomm.train.trainer import TrainConfig, Trainer, lr_at


class Regression:
    """Endless noisy linear-regression batches, resumable: the position is the next batch index."""

    def __init__(self, batch_size=8, seed=0):
        self.batch_size, self.seed, self.index = batch_size, seed, 0
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(6, 1, generator=g)

    def __next__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.index)
        self.index += 1
        x = torch.randn(self.batch_size, 6, generator=g)
        return x, x @ self.w + 0.1 * torch.randn(self.batch_size, 1, generator=g)

    def state_dict(self):
        return {"index": self.index}

    def load_state_dict(self, state):
        self.index = state["index"]


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.Dropout(0.1), torch.nn.Linear(16, 1))

    def forward(self, x):
        return self.body(x)


def mse(model, batch):
    x, y = batch
    dtype = next(model.parameters()).dtype  # bf16/fp16 runs cast the model, the data follows
    loss = torch.nn.functional.mse_loss(model(x.to(dtype)).float(), y)
    return loss, {"rmse": float(loss.detach().sqrt())}


def _cfg(**kw):
    base = dict(steps=12, lr=1e-2, min_lr=1e-3, warmup_steps=3, eval_every=0, save_every=4, log_every=1)
    return TrainConfig(**{**base, **kw})


def test_lr_schedule_warmup_then_cosine():
    cfg = _cfg(steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    assert lr_at(5, cfg) == pytest.approx(0.5) and lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55) and lr_at(100, cfg) == pytest.approx(0.1)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 100))


def test_grad_accumulation_equals_the_big_batch(tmp_path):
    """micro-batch 1 x 8 accumulation steps == batch 8 x 1 (same samples, mean loss)."""
    results = []
    for batch, accum in ((8, 1), (1, 8)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

        class Split(Regression):  # the same 8 samples per step, served as 8 batches of 1 when accumulating
            def __next__(self):
                if batch == 8:
                    return Regression.__next__(self)
                if not hasattr(self, "pending") or not self.pending:
                    x, y = Regression.__next__(self)
                    self.pending = [(x[i:i + 1], y[i:i + 1]) for i in range(8)]
                return self.pending.pop(0)

        trainer = Trainer(model, mse, Split(batch_size=8), _cfg(grad_accum=accum, save_every=0, seed=0), tmp_path / f"r{accum}")
        for _ in range(5):
            trainer.optimizer_step()
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    # float32: the two differ only in the order of the per-sample gradient sums
    torch.testing.assert_close(results[0], results[1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_resume_continues_exactly(tmp_path, precision):
    torch.manual_seed(1)
    full = Trainer(Net(), mse, Regression(), _cfg(), tmp_path / "full", precision=precision)
    full.fit()

    class Interrupt(Exception):
        pass

    def dies_at_step_7(model, batch, _calls=[0]):
        _calls[0] += 1
        if _calls[0] == 7:
            raise Interrupt
        return mse(model, batch)

    torch.manual_seed(1)
    with pytest.raises(Interrupt):
        Trainer(Net(), dies_at_step_7, Regression(), _cfg(), tmp_path / "cut", precision=precision).fit()
    assert latest_checkpoint(tmp_path / "cut").name == "step-00000004"

    torch.manual_seed(123)  # a different init and RNG: everything must come from the checkpoint
    resumed = Trainer(Net(), mse, Regression(), _cfg(), tmp_path / "cut", precision=precision)
    resumed.fit(resume=True)
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)  # bitwise: same ops, same order, same RNG on the same machine
    for a, b in zip(full.mp.parameters(), resumed.mp.parameters()):
        assert torch.equal(a, b)  # the fp32 masters too
    assert full.mp.scale == resumed.mp.scale
    rows = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert rows == [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert (tmp_path / "cut" / "loss.png").stat().st_size > 0


def test_checkpoint_rejects_a_different_model(tmp_path):
    trainer = Trainer(Net(), mse, Regression(), _cfg(steps=1), tmp_path)
    trainer.fit()
    with pytest.raises(ValueError, match="does not match the model"):
        load_checkpoint(latest_checkpoint(tmp_path), torch.nn.Linear(6, 1))


@pytest.mark.parametrize("kwargs,message", [
    (dict(steps=0), "steps: expected an integer >= 1, got 0"),
    (dict(grad_accum=0), "grad_accum: expected an integer >= 1"),
    (dict(lr=1e-4, min_lr=1e-3), "expected 0 <= min_lr <= lr"),
])
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_unknown_config_key_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown keys \['lr_max'\]; valid keys are \['steps'"):
        TrainConfig.from_dict({"lr_max": 1})


SAVER = textwrap.dedent("""
    import sys, torch
    from nanomm.train.checkpoint import save_checkpoint
    model = torch.nn.Linear(512, 1024)  # ~2 MB per save: long enough to be killed mid-write
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 512)).sum().backward(); opt.step()
    step = 0
    while True:
        step += 1
        with torch.no_grad():
            model.weight.fill_(float(step))
        save_checkpoint(sys.argv[1], step, model, opt, {"step_again": step})
        print(step, flush=True)
""")


def test_sigkill_during_save_never_corrupts_latest(tmp_path):
    """A real process is killed at arbitrary moments while it saves in a loop; latest always loads."""
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    for delay in (0.9, 1.3, 1.7):
        proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # at least one complete save exists
        time.sleep(delay * 0.3)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        path = latest_checkpoint(tmp_path / "run")
        model = torch.nn.Linear(512, 1024)
        step, state, _ = load_checkpoint(path, model, torch.optim.AdamW(model.parameters()), restore_rng=False)
        assert state["step_again"] == step and torch.all(model.weight == float(step))
        assert not list((tmp_path / "run" / "checkpoints").glob(".step-*"))  # leftovers were cleaned
