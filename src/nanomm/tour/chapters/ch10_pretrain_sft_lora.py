"""Chapter 10: pretrain vs SFT vs LoRA — the three stages run on one tiny LLaMA and measured.

The notes' table compares pretraining, supervised fine-tuning and LoRA by purpose, data, cost and which
parameters change. Here the three are run in a row on the same model: pretraining on Python's own
documentation (loss against the unigram baseline), full SFT on the code-generated instruction set, and
LoRA SFT from the same pretrained weights. What changed is counted tensor element by tensor element;
the LoRA identity at B = 0, its merge, and its share of LLaMA-7B (built on the meta device) are
computed. Data sizes and costs are claims about industrial runs and stay unverifiable.

``tiny_base`` (also used by chapters 1 and 18) pretrains the model once per process and caches it.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from nanomm import peft
from nanomm.data import LMBatches, encode_documents, load_corpus, train_tokenizer, train_val_split
from nanomm.data.instructions import make_examples
from nanomm.data.tokenizer import TextTokenizer
from nanomm.models import build, count_params, preset
from nanomm.tour.chapter import Chapter, Claim, TourContext
from nanomm.train.objectives import causal_lm, unigram_cross_entropy
from nanomm.train.recipes_finetune import apply_peft, generation_scores, run_steps, sft_trainer
from nanomm.train.trainer import TrainConfig, Trainer

ID = 10
TITLE = "Pretrain vs SFT vs LoRA"

TINY = dict(n_layer=2, dim=64, n_head=4, n_kv_head=2, ff_dim=172)  # llama-tiny, halved


@dataclass
class TinyBase:
    """A pretrained tiny LLaMA (its weights and tokenizer) and what its pretraining measured."""

    state: dict[str, torch.Tensor]
    config: object
    tokenizer: TextTokenizer
    metrics: dict[str, float] = field(default_factory=dict)
    initial: dict[str, torch.Tensor] = field(default_factory=dict)  # the weights before pretraining

    def model(self) -> nn.Module:
        """A fresh copy of the pretrained model (chapters change models in place)."""
        model = build(self.config)
        model.load_state_dict(self.state)
        return model


def quiet_config(steps: int, lr: float, seed: int) -> TrainConfig:
    """Warm-up then cosine over ``steps``; no evaluation, checkpoints or weight decay (the tour's short runs)."""
    return TrainConfig(steps=steps, lr=lr, min_lr=lr / 10, warmup_steps=steps // 10, eval_every=0, save_every=0,
                       weight_decay=0.0, seed=seed)


@functools.lru_cache(maxsize=2)
def tiny_base(quick: bool = True, seed: int = 0) -> TinyBase:
    """Pretrain a 2-layer, 64-wide LLaMA on pydoc for a few seconds; cached for the whole process."""
    corpus = load_corpus("pydoc").subset(20 if quick else 79)
    # the vocabulary comes from the pretraining text alone, as in train_lm: every token the instructions
    # use has then been seen in pretraining (a frozen head cannot learn to emit a token it never trained)
    tok = train_tokenizer(corpus.documents, vocab_size=512)
    train_ids, val_ids = train_val_split(encode_documents(corpus.documents, tok), val_fraction=0.1, seed=seed)
    config = preset("llama-tiny", vocab_size=tok.vocab_size, **TINY)
    torch.manual_seed(seed)
    model = build(config)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    steps, batch = (80, 8) if quick else (600, 16)
    val = LMBatches(val_ids, 64, 16, shuffle=False)
    # run_steps writes nothing: the trainer's folder is never created
    trainer = Trainer(model, causal_lm, LMBatches(train_ids, 64, batch, seed=seed), quiet_config(steps, 3e-3, seed),
                      "unused", val_data=val.epoch_batches)
    trainer.cfg.eval_batches = 8
    start = time.perf_counter()
    before = trainer.evaluate()["val_loss"]
    run_steps(trainer, steps)
    seconds = time.perf_counter() - start
    metrics = {"pretrain_steps": steps, "pretrain_seconds": seconds, "pretrain_val_loss_before": before,
               "pretrain_val_loss": trainer.evaluate()["val_loss"], "pretrain_tokens": steps * batch * 64,
               "unigram_val_loss": unigram_cross_entropy(torch.as_tensor(train_ids), torch.as_tensor(val_ids),
                                                         tok.vocab_size)}
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return TinyBase(state, config, tok, metrics, initial)


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(fraction of parameter elements that changed, fraction of parameter tensors with any change)."""
    moved = total = tensors = 0
    for name, p in after.items():
        diff = (p.detach() != before[name]).sum().item()
        moved, total, tensors = moved + diff, total + p.numel(), tensors + (diff > 0)
    return moved / total, tensors / len(after)


def _sft(base: TinyBase, method: str, steps: int, lr: float, seed: int) -> dict[str, float]:
    model, tok = base.model(), base.tokenizer
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    train, heldout = make_examples("train", seed=seed), make_examples("heldout", seed=seed, limit=12)
    counts = apply_peft(model, method)
    trainer = sft_trainer(model, tok, train, heldout, quiet_config(steps, lr, seed), "unused", batch_size=16, seed=seed)
    val_before = trainer.evaluate()["val_loss"]
    start = time.perf_counter()
    run_steps(trainer, steps)
    out = {**counts, "seconds": time.perf_counter() - start, "val_loss_before": val_before,
           "val_loss": trainer.evaluate()["val_loss"]}
    out["chosen_rate"] = generation_scores(model, tok, heldout)[0]["chosen_rate"]
    # the original parameters under their original names (LoRA wraps a layer as <name>.base)
    params = {k.replace(".base.", "."): p for k, p in model.named_parameters() if "lora_" not in k}
    out["changed_elements"], out["changed_tensors"] = changed(before, params)
    out["base_max_abs_change"] = max(float((p.detach() - before[k]).abs().max()) for k, p in params.items())
    if method == "lora":
        out["lora_merge_max_diff"] = _merge_gap(model)
    return out


def _merge_gap(model: nn.Module) -> float:
    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unmerged = model(ids).logits
        peft.merge(model)
        merged = model(ids).logits
        peft.unmerge(model)
    return float((merged - unmerged).abs().max())


def _lora_identity(base: TinyBase) -> float:
    """max |output with LoRA at initialisation − output without|: B = 0 makes BA = 0."""
    model = base.model().eval()
    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(ids).logits
        peft.apply(model, peft.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
        return float((model(ids).logits - plain).abs().max())


def _llama7b_lora() -> peft.PeftReport:
    model = build(preset("llama-7b"), device="meta")  # shapes only: 6.7B parameters, no memory
    return peft.apply(model, peft.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))


def run(ctx: TourContext) -> Chapter:
    base = tiny_base(ctx.quick, ctx.seed)
    steps = 60 if ctx.quick else 400
    full = _sft(base, "none", steps, 3e-3, ctx.seed)
    lora = _sft(base, "lora", steps, 1e-2, ctx.seed)  # few trained weights: larger steps
    identity = _lora_identity(base)
    pre_changed, pre_tensors = changed(base.initial, dict(base.model().named_parameters()))
    big = _llama7b_lora()
    llama7b = count_params(preset("llama-7b")).total
    m = base.metrics
    claims = [
        Claim(claim="Pretraining: next-token prediction on unlabelled text, learning general knowledge; all "
                    "parameters change",
              notes="任务：自回归语言模型（预测下一个 token） • 改变：所有参数",
              nanomm=(f"{m['pretrain_steps']} steps on pydoc ({m['pretrain_tokens']:,} tokens, "
                      f"{m['pretrain_seconds']:.1f} s): held-out loss {m['pretrain_val_loss_before']:.2f} → "
                      f"{m['pretrain_val_loss']:.2f} nats/token, below the unigram baseline "
                      f"{m['unigram_val_loss']:.2f} (it uses context); {pre_tensors:.0%} of the parameter tensors and "
                      f"{pre_changed:.1%} of their elements changed (embedding rows of tokens absent from the text "
                      f"get no gradient)"),
              verdict="holds" if m["pretrain_val_loss"] < m["unigram_val_loss"] and pre_tensors == 1.0 else "approx",
              source="Radford et al. 2018 §3.1; nanomm.train.objectives.causal_lm"),
        Claim(claim="SFT: supervised (instruction, answer) pairs teach format and behaviour; full fine-tuning "
                    "changes all parameters",
              notes="目的：学习特定任务的格式和行为 • 改变：所有参数（全量微调）",
              nanomm=(f"{steps} steps of full SFT (loss on response tokens only): trainable "
                      f"{full['trainable_percent']:.0f}%, {full['changed_tensors']:.0%} of tensors and "
                      f"{full['changed_elements']:.1%} of elements changed; held-out response loss "
                      f"{full['val_loss_before']:.2f} → "
                      f"{full['val_loss']:.2f}; greedy answers of the asked-for kind {full['chosen_rate']:.0%} "
                      f"(the pretrained model: never, it does not know the template)"),
              verdict="holds" if full["changed_tensors"] == 1.0 and full["val_loss"] < full["val_loss_before"]
              else "approx",
              source="Ouyang et al. 2022 §3.5 (SFT on demonstrations); Wei et al. 2022 (FLAN, instruction tuning)"),
        Claim(claim="LoRA: W' = W + BA, B ∈ R^(d×r), A ∈ R^(r×k); B initialised to zero; scaled by α/r",
              notes="W' = W + BA，其中 B ∈ R^(d×r), A ∈ R^(r×k)，r << d ；self.B = np.zeros((out_dim, rank))",
              nanomm=(f"at initialisation the LoRA model's logits equal the base's (max |diff| {identity:.1e}); "
                      f"merged W + (α/r)BA gives the unmerged outputs to {lora['lora_merge_max_diff']:.1e}; "
                      f"nanomm initialises A Kaiming-uniform (a = √5) like loralib, the notes' snippet N(0, 0.01²): "
                      f"either works while B = 0"),
              verdict="holds" if identity == 0.0 and lora["lora_merge_max_diff"] < 1e-4 else "wrong",
              source="Hu et al. 2021 §4.1; microsoft/LoRA loralib/layers.py reset_parameters"),
        Claim(claim="LoRA changes < 1% of the parameters; the original weights stay frozen",
              notes="参数改变：< 1% • 改变：只有 LoRA 参数（原始参数冻结）",
              nanomm=(f"LLaMA-7B ({llama7b:,} parameters), r = 8 on q_proj and v_proj: {big.trainable:,} trainable "
                      f"= {big.percent:.3f}%. On the tiny model (all-linear, r = 8) {lora['trainable_percent']:.1f}%, "
                      f"since a 64-wide layer has few weights to share the rank with; after {steps} steps the base "
                      f"weights moved by max {lora['base_max_abs_change']:.1e}; held-out response loss "
                      f"{lora['val_loss_before']:.2f} → {lora['val_loss']:.2f} (full SFT: {full['val_loss']:.2f})"),
              verdict="holds" if big.percent < 1 and lora["base_max_abs_change"] == 0.0 else "wrong",
              source="Hu et al. 2021 §4 and Table 4 (GPT-3: 0.01% of parameters); peft print_trainable_parameters"),
        Claim(claim="Data: pretraining TB-scale, SFT tens of thousands of pairs, LoRA thousands",
              notes="数据量 | TB 级 | 万级 | 千级",
              nanomm=(f"not checkable at this scale; here {m['pretrain_tokens']:,} pretraining tokens and "
                      f"{len(make_examples('train', seed=ctx.seed)):,} generated instruction examples for both SFT and "
                      f"LoRA. LoRA needs no less data than full SFT: it changes what is trained, not what is seen"),
              verdict="unverifiable",
              source="Touvron et al. 2023 (LLaMA: 1.4T tokens); Zhou et al. 2023 (LIMA: 1,000 SFT examples)"),
        Claim(claim="Cost: pretraining extremely high, SFT medium, LoRA low (one GPU)",
              notes="成本 | 极高 | 中等 | 低",
              nanomm=(f"industrial costs are not measurable here; on this run the step times were full SFT "
                      f"{1e3 * full['seconds'] / steps:.0f} ms, LoRA {1e3 * lora['seconds'] / steps:.0f} ms (a "
                      f"tiny model saves little compute: LoRA's gain is memory for gradients and optimizer state, "
                      f"chapter 18)"),
              verdict="unverifiable",
              source="Hu et al. 2021 §4.2 (GPT-3 175B: VRAM 1.2 TB → 350 GB, 25% faster training)"),
    ]
    demo = {**{k: float(v) for k, v in m.items()}, "pretrain_changed_elements": pre_changed,
            "pretrain_changed_tensors": pre_tensors,
            **{f"sft_full_{k}": float(v) for k, v in full.items()},
            **{f"sft_lora_{k}": float(v) for k, v in lora.items()},
            "lora_init_max_diff": identity, "llama7b_lora_qv_r8_trainable_percent": big.percent}
    lines = [
        f"One tiny LLaMA ({sum(v.numel() for v in base.state.values()):,} parameters, 2 layers, 64 wide), "
        "three stages: pretraining on pydoc, then full SFT or LoRA SFT (all-linear, r = 8) from the same weights, "
        "each for the same number of steps on the instruction set of `nanomm.data.instructions`.",
        "| stage | trainable | tensors changed | held-out loss | answers of the asked-for kind |",
        "|---|---|---|---|---|",
        f"| pretrain | 100% | {pre_tensors:.0%} | {m['pretrain_val_loss']:.2f} (unigram "
        f"{m['unigram_val_loss']:.2f}) | — |",
        f"| SFT (full) | {full['trainable_percent']:.0f}% | {full['changed_tensors']:.0%} | {full['val_loss']:.2f} | "
        f"{full['chosen_rate']:.0%} |",
        f"| LoRA | {lora['trainable_percent']:.1f}% | A and B only (base: {lora['changed_tensors']:.0%}) | "
        f"{lora['val_loss']:.2f} | {lora['chosen_rate']:.0%} |",
    ]
    return Chapter(claims=claims, demo=demo, lines=lines)
