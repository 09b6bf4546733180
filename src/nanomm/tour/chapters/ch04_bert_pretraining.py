"""Chapter 4: BERT pretraining and embeddings — MLM 15% and 80/10/10, NSP 50/50, and what the embedding is.

The rates are measured, not restated: NSP pairs are built from the pydoc corpus with nanomm.data's
transcription of google-research/bert's create_pretraining_data.py, then masked dupe_factor times
(10, as the reference; 2 in quick mode), and every rate is compared with the notes' figure within
5 binomial standard deviations. The embedding claims are read off nanomm.models' BERT (bert-base on
the meta device, bert-tiny for the init) and off a real BERT checkpoint (all-MiniLM-L6-v2) when its
package is installed. The notes' numpy BertEmbedding is run as written, on batched input.
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch
from torch import nn

from nanomm.data import (IGNORE_INDEX, TextTokenizer, collate_pairs, load_corpus, make_nsp_pairs, mask_tokens,
                         minilm_path, minilm_tokenizer, n_predictions, sentence_ids, train_tokenizer)
from nanomm.tour.chapter import Chapter, Claim, TourContext

ID = 4
TITLE = "BERT pretraining and embeddings"

SIGMAS = 5  # a measured rate "holds" within 5 binomial standard deviations of the notes' figure
REFERENCE = "google-research/bert create_pretraining_data.py"


def _sigma(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / max(n, 1))


def _tokenizer(corpus) -> tuple[TextTokenizer, str]:
    """BERT's own uncased WordPiece (via MiniLM) when installed; otherwise one trained on the corpus."""
    try:
        return minilm_tokenizer(), "BERT uncased WordPiece (30,522, from all-MiniLM-L6-v2)"
    except ModuleNotFoundError:
        return train_tokenizer(corpus.documents, "wordpiece", vocab_size=8192), "WordPiece trained on pydoc (8,192)"


# ----------------------------------------------------------------------------- masked LM

def _mlm(tok: TextTokenizer, batch: dict, reps: int, seed: int) -> dict[str, float]:
    ids, real = batch["input_ids"], batch["attention_mask"]
    special = tok.special_tokens_mask(ids)
    counts = dict(tokens=0, chosen=0, masked=0, kept=0, random=0, specials_chosen=0, candidates=0)
    for r in range(reps):  # the reference writes dupe_factor differently masked copies of the data
        out, labels = mask_tokens(ids, special_mask=special, attention_mask=real, vocab_size=tok.vocab_size,
                                  mask_id=tok.mask_id, generator=torch.Generator().manual_seed(seed + r))
        chosen = labels != IGNORE_INDEX
        o, orig = out[chosen], ids[chosen]
        counts["tokens"] += int(real.sum())
        counts["candidates"] += int((real.bool() & ~special).sum())
        counts["chosen"] += int(chosen.sum())
        counts["masked"] += int((o == tok.mask_id).sum())
        counts["kept"] += int((o == orig).sum())
        counts["random"] += int(((o != orig) & (o != tok.mask_id)).sum())
        counts["specials_chosen"] += int((chosen & special).sum())
    expected_k = int(n_predictions(real.sum(1)).sum()) * reps
    counts["exact_count"] = float(expected_k == counts["chosen"])
    counts["rounding_bound"] = 0.5 * len(ids) * reps / counts["tokens"]  # round() moves each row by <= 1/2 token
    return counts


def _mlm_claims(m: dict[str, float], n_pairs: int, reps: int) -> list[Claim]:
    share = m["chosen"] / m["tokens"]
    select = Claim(
        claim="MLM chooses 15% of the tokens",
        notes="随机选 15% 的 token",
        nanomm=f"{share:.2%} of {m['tokens']:,} tokens ({n_pairs:,} pydoc pairs × {reps} maskings); exactly "
               f"min(20, max(1, round(0.15·n))) per sequence: {'yes' if m['exact_count'] else 'NO'}",
        verdict="holds" if abs(share - 0.15) <= m["rounding_bound"] and m["exact_count"] else "wrong",
        source=f"{REFERENCE}: a fixed count per sequence, not a 15% coin per token (transformers' collator)",
    )
    rows = [("80% of them become [MASK]", "其中 80% 替换成 [MASK]", "masked", 0.8),
            ("10% become a random token", "10% 替换成随机词", "random", 0.1),
            ("10% stay unchanged", "10% 保持不变", "kept", 0.1)]
    out = [select]
    for claim, notes, key, p in rows:
        rate, s = m[key] / m["chosen"], _sigma(p, m["chosen"])
        out.append(Claim(claim=claim, notes=notes,
                         nanomm=f"{rate:.2%} of {m['chosen']:,} chosen (σ = {s:.2%}, {abs(rate - p) / s:.1f}σ off)",
                         verdict="holds" if abs(rate - p) <= SIGMAS * s else "wrong",
                         source=f"{REFERENCE} (a random draw that hits the original token counts as unchanged)"))
    return out


def _cap(tok: TextTokenizer, sentences, seed: int) -> tuple[int, float, int]:
    """Long pairs (512) masked with the default cap: the largest count, and how often the cap binds."""
    pairs = make_nsp_pairs(sentences, cls_id=tok.cls_id, sep_id=tok.sep_id, max_seq_length=512,
                           short_seq_prob=0.0, seed=seed)
    batch = collate_pairs(pairs, tok.pad_id)
    ids, real = batch["input_ids"], batch["attention_mask"]
    labels = mask_tokens(ids, special_mask=tok.special_tokens_mask(ids), attention_mask=real,
                         vocab_size=tok.vocab_size, mask_id=tok.mask_id,
                         generator=torch.Generator().manual_seed(seed)).labels
    uncapped = n_predictions(real.sum(1), max_predictions=None)
    return int((labels != IGNORE_INDEX).sum(1).max()), float((uncapped > 20).float().mean()), len(pairs)


# ----------------------------------------------------------------------------- next sentence

def _nsp_claim(pairs) -> tuple[Claim, dict[str, float]]:
    coin = [p for p in pairs if not p.forced]
    coin_next = sum(not p.is_random_next for p in coin) / len(coin)
    overall_next = sum(not p.is_random_next for p in pairs) / len(pairs)
    forced = 1 - len(coin) / len(pairs)
    coin_ok = abs(coin_next - 0.5) <= SIGMAS * _sigma(0.5, len(coin))
    overall_ok = abs(overall_next - 0.5) <= SIGMAS * _sigma(0.5, len(pairs))
    claim = Claim(
        claim="NSP: 50% of pairs are the true next segment",
        notes="50% 是真正连续的句子，50% 是随机拼接的",
        nanomm=f"the coin: {coin_next:.1%} IsNext over {len(coin):,} chunks that have a continuation; overall "
               f"{overall_next:.1%} of {len(pairs):,}, because {forced:.1%} of chunks are a single sentence and "
               "always take a random B",
        verdict=("holds" if overall_ok else "approx") if coin_ok else "wrong",
        source=f"{REFERENCE}: `len(current_chunk) == 1 or rng.random() < 0.5` -> random next (label 1 in "
               "transformers' BertForPreTraining)",
    )
    return claim, {"nsp_isnext_coin": coin_next, "nsp_isnext_overall": overall_next, "nsp_forced_random": forced}


# ----------------------------------------------------------------------------- embeddings

class NotesBertEmbedding:
    """The notes' snippet as written, with its weights passed in instead of drawn by np.random.randn."""

    def __init__(self, token_emb, segment_emb, position_emb):
        self.token_emb, self.segment_emb, self.position_emb = token_emb, segment_emb, position_emb

    def forward(self, token_ids, segment_ids):
        seq_len = len(token_ids)  # the batch size, once token_ids is (B, T)
        token_emb = self.token_emb[token_ids]
        segment_emb = self.segment_emb[segment_ids]
        position_emb = self.position_emb[:seq_len]
        return token_emb + segment_emb + position_emb


def embedding_sum(w: dict[str, np.ndarray], ids: np.ndarray, seg: np.ndarray) -> np.ndarray:
    """The sum done right for (B, T) ids: positions follow the last axis, broadcast over the batch."""
    return w["word"][ids] + w["type"][seg] + w["pos"][:ids.shape[-1]][None]  # (B, T, d)


def bert_embedding(w: dict[str, np.ndarray], ids: np.ndarray, seg: np.ndarray, eps: float) -> np.ndarray:
    """BERT's embedding at eval time: the sum, then LayerNorm (dropout is the identity)."""
    x = embedding_sum(w, ids, seg)
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w["gamma"] + w["beta"]


def _real_bert():
    """all-MiniLM-L6-v2 (a real BERT): its embedding tensors, its LayerNorm eps, and nanomm's BertEmbeddings
    holding the same tensors; None when the package is not installed."""
    try:
        folder = minilm_path()
    except ModuleNotFoundError:
        return None
    from safetensors import safe_open

    import nanomm.models as models

    names = {"word": "word_embeddings.weight", "pos": "position_embeddings.weight",
             "type": "token_type_embeddings.weight", "gamma": "LayerNorm.weight", "beta": "LayerNorm.bias"}
    with safe_open(str(folder / "model.safetensors"), "np") as f:
        w = {k: f.get_tensor("embeddings." + v) for k, v in names.items()}
    hf = json.loads((folder / "config.json").read_text())
    config = models.preset("bert-base", vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layer=1,
                           n_head=hf["num_attention_heads"], ff_dim=hf["intermediate_size"],
                           max_positions=hf["max_position_embeddings"], layer_norm_eps=hf["layer_norm_eps"],
                           task="base")
    emb = _find(models.build(config), "BertEmbeddings").eval()  # only the embeddings are compared
    norm = _find(emb, "LayerNorm")
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(w["gamma"]))
        norm.bias.copy_(torch.from_numpy(w["beta"]))
        for p in emb.parameters():  # the three tables, told apart by their shapes
            table = next((w[k] for k in ("word", "pos", "type") if p.shape == w[k].shape), None)
            if p.dim() == 2 and table is not None:
                p.copy_(torch.from_numpy(table))
    return {k: v.astype(np.float64) for k, v in w.items()}, hf["layer_norm_eps"], emb


def _find(module: nn.Module, kind: str | type) -> nn.Module:
    """The first submodule of a class (given by name, or by type)."""
    for m in module.modules():
        if (type(m).__name__ == kind) if isinstance(kind, str) else isinstance(m, kind):
            return m
    raise LookupError(f"module: expected a {kind} inside {type(module).__name__}, found none")


def _snippet_on_batches(w: dict[str, np.ndarray], rng: np.random.Generator) -> tuple[list[str], dict[str, float]]:
    """The notes' class on 1-D and batched ids, against the correct sum."""
    notes = NotesBertEmbedding(w["word"], w["type"], w["pos"])
    report, demo = [], {}
    for shape in [(6,), (2, 5), (1, 6)]:
        ids, seg = rng.integers(1000, len(w["word"]), shape), rng.integers(0, 2, shape)
        key = "x".join(map(str, shape))
        right = embedding_sum(w, np.atleast_2d(ids), np.atleast_2d(seg)).reshape(*shape, -1)
        try:
            diff = float(np.abs(notes.forward(ids, seg) - right).max())
        except ValueError as e:  # numpy cannot broadcast (B, T, d) against (B, d)
            report.append(f"{shape}: ValueError '{str(e).split(' with shapes')[0]}'")
            demo[f"snippet_raises_{key}"] = 1.0
            continue
        demo[f"snippet_max_error_{key}"] = diff
        report.append(f"{shape}: " + ("correct" if diff == 0 else f"runs, silently wrong (max |Δ| = {diff:.2f})"))
    return report, demo


def _embedding_claims(tok: TextTokenizer, tok_name: str, seed: int) -> tuple[list[Claim], dict[str, float]]:
    import nanomm.models as models

    torch.manual_seed(seed)
    base = models.preset("bert-base")
    emb = _find(models.build(base, device="meta"), "BertEmbeddings")  # shapes only, no memory
    norm, drop = _find(emb, "LayerNorm"), _find(emb, nn.Dropout)
    shapes = sorted((tuple(p.shape) for p in emb.parameters() if p.dim() == 2), reverse=True)
    tiny = _find(models.build(models.preset("bert-tiny")), "BertEmbeddings")
    table = max(tiny.parameters(), key=lambda p: p.numel()).detach()  # the token table
    std, top = float(table.std()), float(table.abs().max())
    sigma = models.preset("bert-tiny").init_std
    # N(0, σ²) cut at ±2σ has variance σ²·(1 − 2·2φ(2) / (Φ(2) − Φ(−2))), std 0.880σ
    trunc_std = sigma * math.sqrt(1 - 4 * math.exp(-2) / math.sqrt(2 * math.pi) / math.erf(2 / math.sqrt(2)))
    real = _real_bert()
    rng = np.random.default_rng(seed)
    if real is None:  # no checkpoint installed: the snippet runs on nanomm's bert-tiny tables
        d = table.shape[1]
        w = {"word": table.double().numpy(), "pos": rng.normal(0, sigma, (512, d)), "type": rng.normal(0, sigma, (2, d))}
        snippet, demo = _snippet_on_batches(w, rng)
        real_text, fix_text = "", ""
    else:
        w, eps, ours_emb = real
        snippet, demo = _snippet_on_batches(w, rng)
        ids, seg = rng.integers(1000, len(w["word"]), (3, 9)), rng.integers(0, 2, (3, 9))
        with torch.no_grad():
            ours = ours_emb(torch.as_tensor(ids), torch.as_tensor(seg)).double().numpy()
        fix_err = float(np.abs(bert_embedding(w, ids, seg, eps) - ours).max())
        rms_sum = float(np.sqrt((embedding_sum(w, ids, seg) ** 2).mean()))
        rms_ln = float(np.sqrt((bert_embedding(w, ids, seg, eps) ** 2).mean()))
        demo |= {"fixed_snippet_vs_nanomm_max_error": fix_err, "real_rms_before_layernorm": rms_sum,
                 "real_rms_after_layernorm": rms_ln}
        real_text = (f"; the real all-MiniLM-L6-v2 checkpoint stores embeddings.LayerNorm (γ mean "
                     f"{w['gamma'].mean():.2f}) with layer_norm_eps = {eps:g}, and it moves the RMS from "
                     f"{rms_sum:.3f} (the notes' sum) to {rms_ln:.3f}")
        fix_text = (f"; the batched fix plus LayerNorm equals nanomm's BertEmbeddings on MiniLM's weights "
                    f"to {fix_err:.1e}")
    d = base.dim
    want = [(base.vocab_size, d), (base.max_positions, d), (base.type_vocab_size, d)]
    claims = [
        Claim(claim="Input embedding = token + segment + position",
              notes="Token Embedding + Segment Embedding + Position Embedding",
              nanomm=f"incomplete: nanomm's bert-base applies {type(norm).__name__}(eps={norm.eps:g}) and "
                     f"Dropout(p={drop.p:g}) after the sum{real_text}",
              verdict="approx",
              source="google-research/bert modeling.py embedding_postprocessor -> layer_norm_and_dropout; "
                     "transformers BertEmbeddings"),
        Claim(claim="Tables: vocabulary × 768 (WordPiece), 2 × 768 segments, 512 × 768 learned positions",
              notes="词表大小 × 768；2 × 768；512 × 768",
              nanomm=f"bert-base tables {shapes}; tokenizer: {tok_name} with {tok.vocab_size:,} tokens",
              verdict="holds" if sorted(want, reverse=True) == shapes else "wrong",
              source="BERT paper §3 and the released uncased_L-12_H-768_A-12 vocab (30,522)"),
        Claim(claim="Initialisation of the tables (the notes' snippet)",
              notes="np.random.randn(...), i.e. N(0, 1)",
              nanomm=f"normal truncated at ±2σ, σ = {sigma:g}: bert-tiny's token table has std {std:.4f} "
                     f"(expected {trunc_std:.4f}) and max |w| {top:.4f} ≤ {2 * sigma:g}",
              verdict="holds" if abs(std - 1.0) < 0.1 else "wrong",
              source="google-research/bert modeling.py create_initializer: truncated_normal(stddev=0.02)"),
        Claim(claim="The notes' BertEmbedding code works on model inputs",
              notes="position_emb = self.position_emb[:len(token_ids)]",
              nanomm="on ids of shape " + "; ".join(snippet) + fix_text,
              verdict="wrong" if any(k.startswith("snippet_raises") or v > 0 for k, v in demo.items()
                                     if k.startswith("snippet_")) else "holds",
              source="len() of a (B, T) array is B: positions follow the batch axis; numpy broadcasting rules"),
    ]
    return claims, demo | {"tiny_token_table_std": std, "tiny_token_table_max_abs": top}


# ----------------------------------------------------------------------------- the chapter

def _plot(ctx: TourContext, m: dict[str, float], nsp: dict[str, float]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("chosen / tokens", m["chosen"] / m["tokens"], 0.15, m["tokens"]),
            ("[MASK]", m["masked"] / m["chosen"], 0.8, m["chosen"]),
            ("random", m["random"] / m["chosen"], 0.1, m["chosen"]),
            ("unchanged", m["kept"] / m["chosen"], 0.1, m["chosen"]),
            ("IsNext (coin)", nsp["nsp_isnext_coin"], 0.5, nsp["n_coin"]),
            ("IsNext (all)", nsp["nsp_isnext_overall"], 0.5, nsp["n_pairs"])]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r[2] for r in rows], 0.4, label="the notes", color="#bbbbbb")
    ax.bar(x + 0.2, [r[1] for r in rows], 0.4, yerr=[SIGMAS * _sigma(r[2], int(r[3])) for r in rows],
           label=f"measured on pydoc (±{SIGMAS}σ)", color="#3b75af", capsize=3)
    ax.set_xticks(x, [r[0] for r in rows], fontsize=8)
    ax.set_ylabel("rate")
    ax.set_title("BERT pretraining data: the notes' rates vs measured")
    ax.legend(fontsize=8, loc="upper center")
    fig.tight_layout()
    path = ctx.plot_path("ch04_mlm_nsp_rates")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(ctx: TourContext) -> Chapter:
    corpus = load_corpus("pydoc")
    if ctx.quick:
        corpus = corpus.subset(30)
    reps = 2 if ctx.quick else 10
    tok, tok_name = _tokenizer(corpus)
    sentences = sentence_ids(corpus.documents, tok)
    pairs = make_nsp_pairs(sentences, cls_id=tok.cls_id, sep_id=tok.sep_id, max_seq_length=128, seed=ctx.seed)
    m = _mlm(tok, collate_pairs(pairs, tok.pad_id), reps, ctx.seed)
    nsp_claim, nsp = _nsp_claim(pairs)
    nsp |= {"n_pairs": len(pairs), "n_coin": sum(not p.forced for p in pairs)}
    cap_max, cap_share, n_long = _cap(tok, sentences, ctx.seed)
    omitted = Claim(
        claim="(omitted by the notes) [CLS]/[SEP]/[PAD] are never chosen; at most 20 predictions per sequence",
        notes="(not mentioned)",
        nanomm=f"special tokens chosen: {m['specials_chosen']} of {m['chosen']:,} choices; on {n_long} pairs of up to "
               f"512 tokens the cap binds for {cap_share:.0%} of them and the largest count is {cap_max}",
        verdict="approx" if m["specials_chosen"] == 0 and cap_max <= 20 else "wrong",
        source=f"{REFERENCE}: cand_indexes skip [CLS]/[SEP]; max_predictions_per_seq = 20 at length 128 "
               "(the README uses 80 at 512)",
    )
    emb_claims, emb_demo = _embedding_claims(tok, tok_name, ctx.seed)
    claims = [*_mlm_claims(m, len(pairs), reps), omitted, nsp_claim, *emb_claims]
    demo = {"pairs": float(len(pairs)), "tokens": float(m["tokens"]), "chosen": float(m["chosen"]),
            "chosen_share": m["chosen"] / m["tokens"], "chosen_share_of_candidates": m["chosen"] / m["candidates"],
            "mask_rate": m["masked"] / m["chosen"], "random_rate": m["random"] / m["chosen"],
            "unchanged_rate": m["kept"] / m["chosen"], "specials_chosen": float(m["specials_chosen"]),
            "nsp_isnext_coin": nsp["nsp_isnext_coin"], "nsp_isnext_overall": nsp["nsp_isnext_overall"],
            "nsp_forced_random": nsp["nsp_forced_random"], "max_predictions_at_512": float(cap_max),
            "cap_binds_at_512": cap_share, **emb_demo}
    lines = [
        f"Tokenizer: {tok_name}. Corpus: pydoc, {len(corpus)} documents, cut into sentences and paired as "
        f"create_pretraining_data.py does (max_seq_length 128, short_seq_prob 0.1), then masked {reps} times.",
        "The 15% is a count, not a coin: each sequence of n tokens gets exactly min(20, max(1, round(0.15·n))) "
        "targets, drawn among its non-special tokens; transformers' DataCollatorForLanguageModeling instead flips "
        "a 15% coin per token with no cap (same 80/10/10; tests/data/test_mlm.py checks both).",
        "NSP's coin is fair, but a chunk of one sentence has no continuation and always takes a random B, so on "
        "real text a little more than half of the pairs are NotNext.",
        "BERT's embedding is LayerNorm(token + segment + position), then dropout 0.1; nanomm.models.bert."
        "BertEmbeddings is that, and the notes' numpy class only works on a single unbatched sequence.",
    ]
    return Chapter(claims=claims, demo=demo, lines=lines, plots=[_plot(ctx, m, nsp)])
