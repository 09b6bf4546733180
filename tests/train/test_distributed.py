"""Data parallel on 2 CPU processes (gloo): every mode takes the steps one process takes, each rank holds what
the ZeRO memory model says, sharded checkpoints consolidate to a file a plain model loads, bad configs fail
before training."""

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, load_model

from nanomm.models import build, preset
from nanomm.train.consolidate import consolidate, write_shard
from nanomm.train.deepspeed_engine import batch_rows, check_ds_config, remove_stale_locks
from nanomm.train.distributed import check_mode, check_shardable, free_port, launch, shard_batch
from nanomm.train.memory import activations, model_states
from nanomm.train.memory_report import (LiveBytes, checkpoint_blocks, memory_rows, optimizer_tensors,
                                        print_memory_table, stored_activations)
from nanomm.train.trainer import Trainer

sys.path.insert(0, str(Path(__file__).parent))
import distributed_jobs as jobs  # noqa: E402  (a module the forked processes run)

WORLD = 2
FINAL = "checkpoints/step-00000003/model.safetensors"


def _spawn(runs: list[dict], out: Path) -> dict[tuple[str, int], dict]:
    """Train every run in one pair of forked processes; (run name, rank) -> history and bytes held."""
    queue = mp.get_context("fork").SimpleQueue()
    mp.start_processes(jobs.run_modes, args=(WORLD, free_port(), runs, str(out), queue), nprocs=WORLD, join=True,
                       start_method="fork")
    results = {}
    while not queue.empty():
        rank, name, payload = queue.get()
        results[(name, rank)] = payload
    return results


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: one process, the whole global batch, the shared Trainer."""
    job = jobs.tiny_job()
    trainer = Trainer(job.model, job.objective, job.train_data, job.cfg, tmp_path_factory.mktemp("one"),
                      val_data=job.val_data, tokens_per_batch=job.tokens_per_batch)
    history = trainer.fit()
    weights = {n: p.detach().clone() for n, p in job.model.named_parameters()}
    opt_bytes = sum(t.numel() * t.element_size() for t in optimizer_tensors(trainer.optimizer.state))
    return {"losses": [r["loss"] for r in history], "val_loss": history[-1]["val_loss"], "grad_norms": [r["grad_norm"] for r in history],
            "tokens": [r["tokens"] for r in history], "weights": weights, "optimizer": opt_bytes,
            "n": sum(p.numel() for p in job.model.parameters()), "tensors": len(weights),
            "largest": max(p.numel() for p in job.model.parameters())}


@pytest.fixture(scope="module")
def torch_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("torch")
    runs = [{"name": m, "mode": m} for m in ("ddp", "zero1", "zero2", "zero3")]
    runs.append({"name": "zero3_checkpointed", "mode": "zero3", "activation_checkpointing": True})
    return out, _spawn(runs, out)


@pytest.fixture(scope="module")
def deepspeed_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed")
    # the notes' config format; 8 = micro-batch 2 × accumulation 2 × 2 processes
    runs = [{"name": f"ds{s}", "mode": "deepspeed",
             "ds_config": {"train_batch_size": 8, "gradient_accumulation_steps": 2, "zero_optimization": {"stage": s}}}
            for s in (1, 2, 3)]
    return out, _spawn(runs, out)


def _same_training(one, out, results, name):
    for rank in range(WORLD):
        losses = [r["loss"] for r in results[(name, rank)]["history"]]
        # fp32: the ranks average two half-batch means where one process takes one mean: the same numbers
        # summed in another order, ~1e-7 relative
        assert losses == pytest.approx(one["losses"], rel=1e-5)
        # Adam and clipping forgive a gradient off by a constant factor; the norm before clipping does not
        norms = [r["grad_norm"] for r in results[(name, rank)]["history"]]
        assert norms == pytest.approx(one["grad_norms"], rel=1e-5)
        # each rank trained on its half of every global batch: together, the tokens one process saw
        assert [r["tokens"] for r in results[(name, rank)]["history"]] == one["tokens"]
        # validation: each rank scores its half of every validation batch, the means are averaged
        assert results[(name, rank)]["history"][-1]["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)
    weights = load_file(str(out / name / FINAL))
    assert sorted(weights) == sorted(one["weights"])
    for key, want in one["weights"].items():
        # Adam divides each gradient by its own running RMS, which turns 1e-7 relative differences of
        # near-zero gradients into at most ~1e-5 absolute over 3 steps of lr 1e-2
        torch.testing.assert_close(weights[key], want, atol=5e-5, rtol=0)


@pytest.mark.parametrize("mode", ["ddp", "zero1", "zero2", "zero3", "zero3_checkpointed"])
def test_torch_modes_train_like_one_process(one_process, torch_runs, mode):
    out, results = torch_runs
    _same_training(one_process, out, results, mode)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_stages_train_like_one_process(one_process, deepspeed_runs, stage):
    out, results = deepspeed_runs
    _same_training(one_process, out, results, f"ds{stage}")


STAGE = {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3}  # mode -> the memory model's ZeRO stage


@pytest.mark.parametrize("mode", list(STAGE))
def test_each_rank_holds_what_the_memory_model_says(one_process, torch_runs, mode):
    _, results = torch_runs
    n, steps = one_process["n"], 4 * one_process["tensors"]  # Adam keeps a 4-byte step counter per tensor
    predicted = model_states(n, stage=STAGE[mode], n_devices=WORLD, precision="fp32").items
    held = [results[(mode, r)]["state_bytes"] for r in range(WORLD)]
    if mode == "ddp":  # replicas: each rank holds the whole unsharded state
        assert all(h["optimizer"] == one_process["optimizer"] for h in held)
    else:  # shards: together the ranks hold m and v exactly once, ≈ 1/N each. ZeroRedundancyOptimizer keeps
        # a tensor's whole state, step counter included, on its owner; FSDP has every counter on every rank
        copies = 0 if mode == "zero1" else WORLD - 1
        assert sum(h["optimizer"] for h in held) == one_process["optimizer"] + copies * steps
        assert all(h["optimizer"] < 0.55 * one_process["optimizer"] for h in held)
    for h in held:
        # FSDP cuts rows (every tensor here has an even row count: exact); ZeRO-1 gives whole tensors to the
        # least-loaded rank, so a rank is off by at most one tensor's Adam state
        margin = steps + (8 * one_process["largest"] if mode == "zero1" else 0)
        assert abs(h["optimizer"] - predicted["optimizer"]) <= margin
        assert h["gradients"] == predicted["gradients"]  # measured after backward, before the step
        # FSDP2 keeps the weights sharded at rest even in "zero2" (it gathers them once per step); the
        # memory model's ZeRO-2 keeps them whole, which is what this rank holds during the step
        assert h["weights"] == (4 * n / WORLD if mode == "zero2" else predicted["weights"])


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_holds_a_twelve_byte_optimizer_even_in_fp32(one_process, deepspeed_runs, stage):
    """DeepSpeed keeps its own fp32 master partition beside Adam's m and v even when the model is fp32:
    K = 12 bytes per parameter, as mixed precision's accounting (ZeRO §3.1), not 8."""
    _, results = deepspeed_runs
    n = one_process["n"]
    predicted = model_states(n, stage=stage, n_devices=WORLD, precision="mixed").items
    for rank in range(WORLD):
        held = results[(f"ds{stage}", rank)]["state_bytes"]
        assert abs(held["optimizer"] - predicted["optimizer"]) <= 8  # 2 param groups' step counters
        assert held["weights"] == 4 * n / (WORLD if stage == 3 else 1)  # fp32 weights, sharded by ZeRO-3 only


# ----------------------------------------------------------------------------- bad configurations, up front

@pytest.mark.parametrize("config,message", [
    ({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4},
     r"expected micro-batch × gradient accumulation × world size = 2 × 4 × 2 = 16, got 32"),
    ({"train_batch_size": 30, "gradient_accumulation_steps": 4},
     r"expected a multiple of gradient_accumulation_steps × world size = 4 × 2 = 8, got 30"),
    ({"zero_optimization": {"stage": 4}}, r"\['stage'\]: expected one of \[0, 1, 2, 3\], got 4"),
    ({"optimizer": {"type": "AdamW"}}, r"ds_config\['optimizer'\]: not accepted"),
    ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "at most one of fp16.enabled and bf16.enabled"),
    ({"train_batch_size": 0}, r"ds_config\['train_batch_size'\]: expected an integer >= 1, got 0"),
])
def test_bad_deepspeed_configs(config, message):
    with pytest.raises(ValueError, match=message):
        check_ds_config(config, world_size=2)


def test_the_data_must_match_the_deepspeed_batch():
    config = {"train_batch_size": 32, "gradient_accumulation_steps": 4}  # the notes' own numbers
    assert batch_rows(config, 2) == 8
    done = check_ds_config(config, world_size=2, rows=8)
    assert (done["train_micro_batch_size_per_gpu"], done["gradient_accumulation_steps"]) == (4, 4)
    with pytest.raises(ValueError, match=r"= 3 × 4 × 2 = 24, got 32"):
        check_ds_config(config, world_size=2, rows=6)
    with pytest.raises(ValueError, match=r"\[.gradient_accumulation_steps.\]: expected 2 like TrainConfig.grad_accum .*got 4"):
        check_ds_config(config, world_size=2, grad_accum=2)


def test_fp16_on_a_cpu_without_fp16_is_refused():
    if torch.ops.mkldnn._is_mkldnn_fp16_supported():
        pytest.skip("this CPU has fp16 kernels")
    with pytest.raises(ValueError, match="no fp16 on this machine; use"):
        check_ds_config({"fp16": {"enabled": True}}, world_size=2, cuda=False)


@pytest.mark.parametrize("mode,nproc,message", [
    ("zero1", 3, r"has 2, so at most 2 processes can each hold a shard; got nproc=3"),
    ("zero2", 5, r"rows in its largest parameter .*has 4, so at most 4 processes"),
    ("deepspeed", 13, r"parameter elements .*has 12, so at most 12 processes"),
])
def test_more_processes_than_shards(mode, nproc, message):
    model = torch.nn.Sequential(torch.nn.Linear(2, 4, bias=False), torch.nn.Linear(4, 1, bias=False))  # 4×2, 1×4
    with pytest.raises(ValueError, match=message):
        check_shardable(model, mode, nproc)
    check_shardable(model, "ddp", 64)  # replicas need no shard


@pytest.mark.parametrize("mode,precision,message", [
    ("zero4", "fp32", r"distributed: expected one of \['ddp', 'deepspeed', 'zero1', 'zero2', 'zero3'\], got 'zero4'"),
    ("zero2", "fp16", r"precision: expected one of \['fp32', 'bf16'\] with distributed='zero2'"),
])
def test_bad_modes(mode, precision, message):
    with pytest.raises(ValueError, match=message):
        check_mode(mode, precision)


def test_launch_refuses_before_starting_any_process(tmp_path):
    with pytest.raises(ValueError, match=r"= 4 × 2 = 8, got 30"):
        launch(jobs.tiny_job, tmp_path, distributed="deepspeed", nproc=2,
               ds_config={"train_batch_size": 30, "gradient_accumulation_steps": 4})
    with pytest.raises(ValueError, match="ds_config: only used with distributed='deepspeed'"):
        launch(jobs.tiny_job, tmp_path, distributed="zero1", ds_config={})
    assert not any(tmp_path.iterdir())  # nothing was started, nothing written


def test_launch_reports_a_job_error_from_the_processes(tmp_path):
    """What depends on the job (the data's batch against train_batch_size) is checked in each process
    before training, and comes back as the same ValueError."""
    with pytest.raises(ValueError, match=r"= 2 × 2 × 2 = 8, got 16"):
        launch(jobs.tiny_job, tmp_path, distributed="deepspeed", nproc=2, start_method="fork",
               ds_config={"train_batch_size": 16, "gradient_accumulation_steps": 2})
    assert not (tmp_path / "checkpoints").exists()


# ----------------------------------------------------------------------------- data slices, shards, locks

@settings(max_examples=25, deadline=None)
@given(world=st.integers(1, 4), per_rank=st.integers(1, 3), extra=st.integers(0, 2))
def test_rank_slices_partition_the_global_batch(world, per_rank, extra):
    rows = world * per_rank
    batch = {"ids": torch.arange(rows * 3).reshape(rows, 3), "pair": (torch.arange(rows), torch.zeros(rows + 1 + extra)),
             "name": "keep"}
    parts = [shard_batch(batch, r, world) for r in range(world)]
    assert torch.equal(torch.cat([p["ids"] for p in parts]), batch["ids"])
    assert torch.equal(torch.cat([p["pair"][0] for p in parts]), batch["pair"][0])
    assert all(p["pair"][1].shape == (rows + 1 + extra,) and p["name"] == "keep" for p in parts)  # not a batch dim


def test_a_batch_that_does_not_divide_is_refused():
    with pytest.raises(ValueError, match="divisible by world_size=2 .*got 5 rows"):
        shard_batch({"x": torch.zeros(5, 2)}, 0, 2)


def _model():
    return build(preset("gpt-tiny", vocab_size=64, n_layer=1, dim=32, n_head=2, ff_dim=64, max_positions=16))


@pytest.mark.parametrize("layout", ["rows", "flat_padded"])
def test_consolidated_shards_load_into_a_plain_model(tmp_path, layout):
    """FSDP-style row chunks and ZeRO-3-style flat partitions (last one padded) both consolidate exactly;
    the tied GPT head is stored once and safetensors' load_model restores the tie."""
    torch.manual_seed(1)
    source = _model()
    for rank in range(3):
        entries = []
        for name, p in source.named_parameters():
            flat = p.detach().reshape(-1)
            if layout == "rows":
                chunk = -(-p.shape[0] // 3)
                start = min(p.shape[0], rank * chunk) * (p.numel() // p.shape[0])
                stop = min(p.shape[0], (rank + 1) * chunk) * (p.numel() // p.shape[0])
            else:
                part = -(-p.numel() // 3)
                start, stop = min(p.numel(), rank * part), min(p.numel(), (rank + 1) * part)
            if stop > start:
                entries.append((name, p.shape, start, flat[start:stop]))
        write_shard(tmp_path / "shards", rank, 3, entries)
    path = consolidate(tmp_path)
    target = _model()
    load_model(target, str(path))  # strict
    for a, b in zip(source.parameters(), target.parameters()):
        assert torch.equal(a, b)


def test_consolidation_refuses_gaps_and_missing_ranks(tmp_path):
    w = torch.arange(6.0)
    write_shard(tmp_path / "a" / "shards", 0, 2, [("w", (6,), 0, w[:2])])
    write_shard(tmp_path / "a" / "shards", 1, 2, [("w", (6,), 3, w[3:])])
    with pytest.raises(ValueError, match="w: the shards leave a gap at element 2 of 6"):
        consolidate(tmp_path / "a")
    write_shard(tmp_path / "b" / "shards", 1, 2, [("w", (6,), 0, w)])
    with pytest.raises(ValueError, match=r"missing ranks \[0\]"):
        consolidate(tmp_path / "b")


def test_stale_extension_locks_are_removed_and_live_ones_kept(tmp_path):
    """A torch extension build killed mid-way leaves its lock file; every later DeepSpeed start then
    waits on it forever (the hang seen here). A lock some process holds open is a build in progress."""
    (tmp_path / "py311_cpu" / "dead").mkdir(parents=True)
    (tmp_path / "py311_cpu" / "live").mkdir(parents=True)
    stale = tmp_path / "py311_cpu" / "dead" / "lock"
    stale.touch()
    live = tmp_path / "py311_cpu" / "live" / "lock"
    fd = os.open(live, os.O_CREAT | os.O_EXCL)  # what torch's FileBaton holds while building
    try:
        assert remove_stale_locks(tmp_path) == [stale]
        assert not stale.exists() and live.exists()
    finally:
        os.close(fd)



# ----------------------------------------------------------------------------- activation checkpointing

def _blocks_forward(model, x, positions):
    """The decoder's block stack on hidden states x (B, T, d); the clone makes the first block's input
    a tensor of this forward pass, stored like every other block's."""
    h = x.clone()
    for block in model.blocks:
        h = block(h, causal=True, **model.positions.attention_kwargs(positions))
    return h


def _tiny_llama(dtype=torch.float32):
    torch.manual_seed(0)
    return build(preset("llama-tiny", vocab_size=64, max_positions=32, n_layer=3, n_head=4, n_kv_head=2, dim=64,
                        ff_dim=128)).to(dtype)


def test_checkpointed_blocks_compute_the_same_loss_and_gradients():
    plain, ckpt = _tiny_llama(), checkpoint_blocks(_tiny_llama())
    ids = torch.randint(64, (2, 16), generator=torch.Generator().manual_seed(0))
    for model in (plain, ckpt):
        model(ids).logits.float().logsumexp(-1).mean().backward()
    assert all(b.checkpointed for b in ckpt.blocks)
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        # the recomputation repeats the same kernels on the same inputs: the same bits
        assert torch.equal(a.grad, b.grad), name
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in ckpt.named_parameters()]


def test_checkpointing_stores_only_the_block_inputs_as_the_memory_model_says():
    B, T = 2, 32
    cfg = _tiny_llama().config
    measured = {}
    for name, wrap in (("plain", lambda m: m), ("checkpoint", checkpoint_blocks)):
        model = wrap(_tiny_llama(torch.bfloat16))  # 16-bit activations, as the formulas count them
        x = torch.randn(B, T, cfg.dim, dtype=torch.bfloat16, requires_grad=True)
        positions = torch.arange(T)
        measured[name] = stored_activations(lambda: _blocks_forward(model, x, positions))
    predicted = activations(cfg.n_layer, cfg.dim, cfg.n_head, seq_len=T, micro_batch=B, mode="checkpoint")
    assert measured["checkpoint"].stored == predicted  # exactly L block inputs of 2·s·b·h bytes
    # without it, each SwiGLU block keeps far more than its input (its gate, up, product, attention inputs...)
    assert measured["plain"].stored > 10 * measured["checkpoint"].stored
    assert measured["plain"].peak > measured["checkpoint"].peak


def test_live_bytes_ignores_views_and_counts_new_storage():
    w = torch.randn(64, 64)
    with LiveBytes() as live:
        t = w.t()  # a view of w: no new memory
        assert live.now == 0
        y = w @ w  # 64·64·4 new bytes
        assert live.now == 64 * 64 * 4
        del y
        assert live.now == 0 and live.peak == 64 * 64 * 4
    assert t.shape == (64, 64)


# ----------------------------------------------------------------------------- the memory table

def test_memory_rows_for_llama_7b():
    n, trainable, rows = memory_rows("llama-7b", 8, seq_len=2048)
    assert n == trainable == 6_738_415_616  # LLaMA-7B's exact count
    by_stage = {r.stage: r for r in rows}
    assert by_stage[0].weights + by_stage[0].gradients + by_stage[0].optimizer == 16 * n  # 107.8 GB, not 112
    want = model_states(n, stage=2, n_devices=8).items
    assert (by_stage[2].weights, by_stage[2].gradients, by_stage[2].optimizer) == tuple(want.values())
    assert by_stage[2].activations == activations(32, 4096, 32, seq_len=2048, micro_batch=1, mode="flash")
    _, lora, lora_rows = memory_rows("llama-7b", 8, lora_r=8)
    assert lora == 4_194_304 and lora_rows[0].optimizer == 12 * lora  # r·(4096 + 4096) on q and v, 32 layers


def test_print_memory_table(capsys):
    print_memory_table("llama-7b", stage=2, gpus=8, lora_r=8)
    out = " ".join(capsys.readouterr().out.split())  # rich wraps the title at the terminal's width
    assert "6,738,415,616 parameters" in out and "4,194,304 trainable" in out and "ZeRO-2" in out
    with pytest.raises(ValueError, match="stage: expected one of"):
        print_memory_table("llama-7b", stage=5, gpus=8)
