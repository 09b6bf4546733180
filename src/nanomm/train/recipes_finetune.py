"""Fine-tuning runs behind ``nanomm train sft`` and ``nanomm train dpo``: a pretrained model, then the
instruction and preference sets of ``nanomm.data.instructions``, on the shared Trainer.

    train lm → base/ ──train_sft(peft=…)──→ sft/ ──train_dpo(beta=0.1, peft="lora")──→ dpo/

SFT is the causal-LM loss on response tokens only (``sft_objective``; packed rows keep attention inside
each example). DPO is ``nanomm.train.dpo.dpo_objective``. With a PEFT method the base is frozen and the
adapter trains; DPO's reference is then the same model with its adapters disabled (no second copy), or
a frozen copy without PEFT. By default the reference's log-probabilities of every pair are computed once
before training and cached on disk (``reference_logps.safetensors``), so training runs no reference
forward at all; ``precompute_reference=False`` runs the reference at every step instead.

Each run folder is a Hugging Face model directory (config.json, model.safetensors, tokenizer.json) —
merged weights when the method merges (none, LoRA, IA3), the untouched base otherwise — plus adapter/
(peft's layout) when a PEFT method was used, metrics.jsonl, loss.png and results.json. Held-out
metrics: the loss; for DPO the rewards as trl logs them; for both, the rate at which greedy generation
answers held-out prompts with the chosen kind of answer (``generation_scores``), before and after.
"""

from __future__ import annotations

import copy
import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from rich.console import Console
from torch import Tensor, nn

from nanomm import peft as peft_lib
from nanomm.data.instructions import (IGNORE_INDEX, Example, PreferenceBatches, SFTBatches, check_response,
                                      collate_preferences, demonstrations, make_examples, prompt_batch)
from nanomm.data.tokenizer import TextTokenizer, load_tokenizer
from nanomm.io import write_json
from nanomm.models import from_hf, to_hf
from nanomm.models.generation import generate
from nanomm.peft import prefix as prefix_lib
from nanomm.train.dpo import DPOConfig, dpo_objective, pair_logps, precompute_reference_logps
from nanomm.train.objectives import causal_lm, token_cross_entropy
from nanomm.train.recipes import RunResult
from nanomm.train.trainer import TrainConfig, Trainer

__all__ = ["PEFT_METHODS", "sft_objective", "segment_attention", "generation_scores", "policy_preference",
           "evaluate_pairs", "apply_peft",
           "load_finetuned", "sft_trainer", "dpo_trainer", "run_steps", "train_sft", "train_dpo"]

# method -> (its config from user options, default SFT learning rate, default DPO learning rate).
# Few trained numbers need large steps: IA3's scales and the prefix move little at LoRA's rate.
# DPO's rates are 10-30x lower: at 1e-3 (LoRA) the margin kept growing by pushing every answer down, the
# chosen ones too, and greedy decoding collapsed (docs/topics/01-dpo.md, "measured").
PEFT_METHODS: dict[str, tuple[Callable[[dict], Any], float, float]] = {
    "none": (lambda o: None, 1e-3, 3e-5),
    "lora": (lambda o: peft_lib.LoraConfig.from_dict({"r": 8, "alpha": 16.0, "target_modules": "all-linear", **o}),
             3e-3, 1e-4),
    "prefix": (lambda o: peft_lib.PrefixConfig.from_dict({"num_virtual_tokens": 8, **o}), 1e-2, 3e-4),
    "adapter": (lambda o: peft_lib.AdapterConfig.from_dict({"bottleneck": 16, **o}), 3e-3, 1e-4),
    "ia3": (lambda o: peft_lib.IA3Config.from_dict(o), 3e-2, 1e-3),
}
MERGEABLE = ("none", "lora", "ia3")


def _check_method(peft: str) -> None:
    if peft not in PEFT_METHODS:
        raise ValueError(f"peft: expected one of {list(PEFT_METHODS)}, got {peft!r}")


# ----------------------------------------------------------------------------- the SFT objective

@contextmanager
def segment_attention(model: nn.Module, segment_ids: Tensor) -> Iterator[None]:
    """Within the block, every attention layer of ``model`` lets a token see only tokens of its own
    segment (causal masking still applies): packed examples then do not see each other."""
    if not hasattr(model, "blocks"):
        raise TypeError(f"model: expected a decoder with blocks, got {type(model).__name__}")
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
    prefix = prefix_lib.find(model)
    if prefix is not None and prefix.enabled:  # every token also sees the P prefix positions
        same = torch.cat([same.new_ones(*same.shape[:2], prefix.n_tokens), same], dim=-1)  # (B, T, P + T)
    mask = same[:, None]  # (B, 1, T, Tk)

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, {**kwargs, "attn_mask": mask}

    handles = [block.register_forward_pre_hook(hook, with_kwargs=True) for block in model.blocks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def sft_objective(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Next-token loss on the response tokens (targets −100 elsewhere); packed batches carry
    position_ids and segment_ids, and attention stays inside each example."""
    if "segment_ids" not in batch:
        return causal_lm(model, batch)
    with segment_attention(model, batch["segment_ids"]):
        out = model(batch["input_ids"], position_ids=batch["position_ids"])
    loss, accuracy = token_cross_entropy(out.logits, batch["targets"])
    return loss, {"accuracy": float(accuracy)}


# ----------------------------------------------------------------------------- evaluation

def _new_token_budget(examples: Sequence[Example], tokenizer: TextTokenizer) -> int:
    """Room for the longer of the chosen and rejected answers, end-of-text included, and one more."""
    answers = [answer for ex in examples for answer in (ex.chosen, ex.rejected)]
    return max(len(ids) + 1 for ids in tokenizer.encode_many(answers)) + 1


@torch.no_grad()
def generation_scores(model: nn.Module, tokenizer: TextTokenizer, examples: Sequence[Example], *,
                      batch_size: int = 64, max_new_tokens: int | None = None
                      ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Greedy answers to the examples' prompts, judged by their tasks' checkers.

    Returns ({"chosen_rate": fraction of all answers of the chosen kind, "chosen_rate/<task>": per task,
    "chosen_rate_macro": mean over tasks}, [{"task", "instruction", "answer", "ok"} per example]).
    """
    if not examples:
        raise ValueError("examples: expected at least one example, got none")
    budget = max_new_tokens or _new_token_budget(examples, tokenizer)
    answers = []
    for start in range(0, len(examples), batch_size):
        part = examples[start:start + batch_size]
        prompts = prompt_batch(part, tokenizer)
        out = generate(model, prompts["input_ids"], prompts["attention_mask"], max_new_tokens=budget,
                       eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
        for ex, tokens in zip(part, out.new_tokens):
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            answers.append({"task": ex.task, "instruction": ex.instruction, "answer": text,
                            "ok": check_response(ex, text)})
    rates: dict[str, float] = {"chosen_rate": sum(a["ok"] for a in answers) / len(answers)}
    for task in dict.fromkeys(a["task"] for a in answers):
        mine = [a["ok"] for a in answers if a["task"] == task]
        rates[f"chosen_rate/{task}"] = sum(mine) / len(mine)
    per_task = [v for k, v in rates.items() if "/" in k]
    rates["chosen_rate_macro"] = sum(per_task) / len(per_task)
    return rates, answers


@torch.no_grad()
def policy_preference(model: nn.Module, batches: Sequence[dict[str, Tensor]]) -> float:
    """Fraction of pairs whose chosen answer the model itself finds likelier: log π(y_w) > log π(y_l)."""
    model.eval()
    wins = total = 0
    for batch in batches:
        chosen, rejected = pair_logps(model, batch)
        wins += int((chosen > rejected).sum())
        total += len(chosen)
    return wins / max(1, total)


@torch.no_grad()
def evaluate_pairs(model: nn.Module, objective: Callable, batches: Sequence[dict[str, Tensor]]) -> dict[str, float]:
    """DPO metrics over every held-out pair: batch means weighted by their number of pairs (the
    trainer's evaluate() averages batch means, which over-weights a short last batch)."""
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    n = 0
    try:
        for batch in batches:
            loss, metrics = objective(model, batch)
            pairs = batch["input_ids"].shape[0] // 2
            for k, v in {"loss": float(loss), **metrics}.items():
                sums[k] = sums.get(k, 0.0) + float(v) * pairs
            n += pairs
    finally:
        model.train(was_training)
    return {f"val_{k}": v / max(1, n) for k, v in sums.items()}


# ----------------------------------------------------------------------------- models and folders

def apply_peft(model: nn.Module, peft: str, options: dict | None = None) -> dict[str, float]:
    """Apply the PEFT method named ``peft`` (no-op for "none"); returns trainable/total/percent."""
    _check_method(peft)
    config = PEFT_METHODS[peft][0](options or {})
    if config is None:
        if options:
            raise ValueError(f"peft_options: peft='none' takes no options, got {options}")
        trainable, total = peft_lib.count_parameters(model)
    else:
        report = peft_lib.apply(model, config)
        trainable, total = report.trainable, report.total
    return {"trainable_params": trainable, "total_params": total, "trainable_percent": 100.0 * trainable / total}


def load_finetuned(path: str | Path) -> tuple[nn.Module, TextTokenizer]:
    """A run folder of train_lm / train_sft / train_dpo: the model (with its adapter when it was not
    merged) and the tokenizer."""
    folder = Path(path)
    results = folder / "results.json"
    info = json.loads(results.read_text()) if results.is_file() else {}
    model = from_hf(folder)
    if info.get("merged") is False:
        peft_lib.load(model, folder / "adapter")
    return model, load_tokenizer(folder)


def _save(model: nn.Module, trainer: Trainer, tokenizer: TextTokenizer, out: Path, peft: str) -> bool:
    """Write the run folder's model; returns whether the adapter was merged into the weights."""
    model.float()
    with torch.no_grad():  # a 16-bit run trained fp32 masters: export those
        for name, master in trainer.mp.named_parameters():
            model.get_parameter(name).copy_(master)
    tokenizer.save(out)
    if peft == "none":
        to_hf(model, out)
        return True
    peft_lib.save(model, out / "adapter")
    merged = peft in MERGEABLE
    to_hf(peft_lib.merge_and_unload(model) if merged else peft_lib.unload(model), out)
    return merged


def _train_config(steps: int, lr: float, seed: int, overrides: dict[str, Any]) -> TrainConfig:
    return TrainConfig(**{"steps": steps, "lr": lr, "min_lr": lr / 10, "warmup_steps": min(50, steps // 10),
                          "eval_every": max(1, steps // 5), "save_every": max(1, steps // 4), "log_every": 5,
                          "seed": seed, "weight_decay": 0.0, **overrides})


def sft_trainer(model: nn.Module, tokenizer: TextTokenizer, train: Sequence[Example], heldout: Sequence[Example],
                cfg: TrainConfig, out_dir: str | Path, *, batch_size: int = 32, pack: bool = False,
                max_length: int | None = None, precision: str = "fp32", seed: int = 0,
                console: Console | None = None) -> Trainer:
    """A Trainer of ``sft_objective`` on ``train``, validated on the held-out examples (unpacked)."""
    batches = SFTBatches(train, tokenizer, batch_size, seed=seed, pack=pack, max_length=max_length)
    val = SFTBatches(heldout, tokenizer, batch_size, shuffle=False)
    cfg = TrainConfig.from_dict({**vars(cfg), "eval_batches": max(cfg.eval_batches, len(val.items))})
    return Trainer(model, sft_objective, batches, cfg, out_dir, val_data=val.epoch_batches, precision=precision,
                   tokens_per_batch=lambda b: int((b["targets"] != IGNORE_INDEX).sum()), console=console)


def dpo_trainer(model: nn.Module, tokenizer: TextTokenizer, train: Sequence[Example], heldout: Sequence[Example],
                cfg: TrainConfig, out_dir: str | Path, *, dpo: DPOConfig, peft: str = "lora",
                peft_options: dict | None = None, batch_size: int = 16, precompute_reference: bool = True,
                precision: str = "fp32", seed: int = 0, console: Console | None = None
                ) -> tuple[Trainer, dict[str, float]]:
    """Apply ``peft`` to ``model`` (the starting policy, also the reference) and build a DPO Trainer.

    Training pairs are indexed 0…N−1 and held-out pairs N…N+M−1 in the reference cache.
    """
    batches = PreferenceBatches(train, tokenizer, batch_size, seed=seed)
    val = PreferenceBatches(heldout, tokenizer, batch_size, shuffle=False, index_base=len(train))
    val_fixed = list(val.epoch_batches())
    cache = reference = None
    if precompute_reference:  # the policy before training IS the reference: one pass, then no reference model
        path = Path(out_dir) / "reference_logps.safetensors"
        cache = precompute_reference_logps(model, [*batches.epoch_batches(), *val_fixed], path,
                                           reduction=dpo.reduction)
    counts = apply_peft(model, peft, peft_options)
    if not precompute_reference and peft == "none":
        reference = copy.deepcopy(model)  # frozen by dpo_objective
    objective = dpo_objective(model, reference, config=dpo, reference_logps=cache)
    cfg = TrainConfig.from_dict({**vars(cfg), "eval_batches": len(val_fixed)})
    trainer = Trainer(model, objective, batches, cfg, out_dir, val_data=lambda: iter(val_fixed), precision=precision,
                      tokens_per_batch=lambda b: int(b["attention_mask"].sum()), console=console)
    return trainer, counts


def run_steps(trainer: Trainer, steps: int, *, eval_every: int = 0) -> list[dict[str, float]]:
    """Optimizer steps without checkpoints or files (the tour's short runs); returns one row per step."""
    rows = []
    for _ in range(steps):
        row = {"step": trainer.step + 1, **trainer.optimizer_step()}
        if eval_every and trainer.step % eval_every == 0:
            row.update(trainer.evaluate())
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- the recipes

def _examples(tasks: Sequence[str] | None, seed: int, heldout_fraction: float) -> tuple[list[Example], list[Example]]:
    return tuple(make_examples(split, tasks=tasks, seed=seed, heldout_fraction=heldout_fraction)
                 for split in ("train", "heldout"))


def train_sft(out_dir: str | Path, base_dir: str | Path, *, peft: str = "lora", steps: int = 300,
              batch_size: int = 32, lr: float | None = None, peft_options: dict | None = None,
              tasks: Sequence[str] | None = None, rejected_fraction: float = 0.0, pack: bool = False,
              max_length: int | None = None, heldout_fraction: float = 0.2, precision: str = "fp32", seed: int = 0,
              resume: bool = False, console: Console | None = None, **train_overrides: Any) -> RunResult:
    """Supervised fine-tuning of the model in ``base_dir`` (e.g. from train_lm) on the instruction set.

    ``rejected_fraction`` > 0 trains on demonstrations of mixed quality (that share of the answers is the
    rejected kind): the starting point whose own answers DPO's pairs then compare. Held-out metrics
    always use the chosen answers.
    """
    _check_method(peft)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_finetuned(base_dir)
    train, heldout = _examples(tasks, seed, heldout_fraction)
    start = time.perf_counter()
    before, _ = generation_scores(model, tokenizer, heldout)
    counts = apply_peft(model, peft, peft_options)
    cfg = _train_config(steps, lr or PEFT_METHODS[peft][1], seed, train_overrides)
    demos = demonstrations(train, rejected_fraction=rejected_fraction, seed=seed)
    trainer = sft_trainer(model, tokenizer, demos, heldout, cfg, out, batch_size=batch_size, pack=pack,
                          max_length=max_length, precision=precision, seed=seed, console=console)
    initial = trainer.evaluate()
    fit_start = time.perf_counter()
    trainer.fit(resume=resume)
    seconds = time.perf_counter() - fit_start
    final = trainer.evaluate()
    after, answers = generation_scores(model, tokenizer, heldout)
    merged = _save(model, trainer, tokenizer, out, peft)
    metrics = {"peft": peft, "merged": merged, "steps": trainer.step, "lr": cfg.lr,
               "rejected_fraction": rejected_fraction, "seconds_train": seconds,
               "seconds_total": time.perf_counter() - start, "val_loss_before": initial["val_loss"],
               "val_loss": final["val_loss"],
               "val_accuracy": final["val_accuracy"], "train_examples": len(train), "heldout_examples": len(heldout),
               **counts, **{f"{k}_before": v for k, v in before.items()},
               **{f"{k}_after": v for k, v in after.items()}, "samples": answers[::max(1, len(answers) // 12)]}
    write_json(out / "results.json", metrics)
    return RunResult(out, metrics)


def train_dpo(out_dir: str | Path, sft_dir: str | Path, *, beta: float = 0.1, loss: str = "sigmoid",
              label_smoothing: float = 0.0, peft: str = "lora", steps: int = 200, batch_size: int = 16,
              lr: float | None = None, peft_options: dict | None = None, tasks: Sequence[str] | None = None,
              heldout_fraction: float = 0.2, precompute_reference: bool = True, precision: str = "fp32",
              seed: int = 0, resume: bool = False, console: Console | None = None,
              **train_overrides: Any) -> RunResult:
    """DPO from the model in ``sft_dir`` (a train_sft folder with merged weights, or any decoder folder)."""
    _check_method(peft)
    info_path = Path(sft_dir) / "results.json"
    if info_path.is_file() and json.loads(info_path.read_text()).get("merged") is False:
        raise ValueError(f"sft_dir: {str(sft_dir)!r} holds an SFT adapter that cannot be merged (prefix or "
                         "adapter); DPO starts from a plain model: run SFT with --peft none, lora or ia3")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_finetuned(sft_dir)
    train, heldout = _examples(tasks, seed, heldout_fraction)
    dpo = DPOConfig(beta=beta, loss=loss, label_smoothing=label_smoothing)
    start = time.perf_counter()
    before, _ = generation_scores(model, tokenizer, heldout)
    cfg = _train_config(steps, lr or PEFT_METHODS[peft][2], seed, train_overrides)
    ref_start = time.perf_counter()
    trainer, counts = dpo_trainer(model, tokenizer, train, heldout, cfg, out, dpo=dpo, peft=peft,
                                  peft_options=peft_options, batch_size=batch_size,
                                  precompute_reference=precompute_reference, precision=precision, seed=seed,
                                  console=console)
    seconds_reference = time.perf_counter() - ref_start
    val_batches = list(trainer.val_data())
    # π = π_ref here: loss log 2, every reward 0, accuracy 0 (ties are not wins)
    initial = evaluate_pairs(model, trainer.objective, val_batches)
    prefers_before = policy_preference(model, val_batches)
    fit_start = time.perf_counter()
    trainer.fit(resume=resume)
    seconds = time.perf_counter() - fit_start
    final = evaluate_pairs(model, trainer.objective, val_batches)
    for task in dict.fromkeys(ex.task for ex in heldout):  # the same pairs and cache indices, task by task
        mine = [i for i, ex in enumerate(heldout) if ex.task == task]
        batches = [collate_preferences([heldout[i] for i in mine[at:at + batch_size]], tokenizer,
                                       [len(train) + i for i in mine[at:at + batch_size]])
                   for at in range(0, len(mine), batch_size)]
        scores = evaluate_pairs(model, trainer.objective, batches)
        final |= {f"{k}/{task}": scores[k] for k in ("val_rewards/accuracies", "val_rewards/margins")}
    prefers_after = policy_preference(model, val_batches)
    after, answers = generation_scores(model, tokenizer, heldout)
    merged = _save(model, trainer, tokenizer, out, peft)
    metrics = {"peft": peft, "merged": merged, "beta": beta, "loss": loss, "steps": trainer.step, "lr": cfg.lr,
               "seconds_reference": seconds_reference, "seconds_train": seconds,
               "seconds_total": time.perf_counter() - start, **final,
               **{f"{k}_before": v for k, v in initial.items()},
               "policy_prefers_chosen_before": prefers_before, "policy_prefers_chosen_after": prefers_after,
               "train_pairs": len(train), "heldout_pairs": len(heldout), **counts,
               **{f"{k}_before": v for k, v in before.items()}, **{f"{k}_after": v for k, v in after.items()},
               "samples": answers[::max(1, len(answers) // 12)]}
    write_json(out / "results.json", metrics)
    return RunResult(out, metrics)
