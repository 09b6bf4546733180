"""Chapter 2: GPT and BERT — structure and sizes, recounted from nanomm's own models.

Every count is nanomm.models.count_params on a preset, and the same model is built on the meta device
(shapes, no memory; GPT-3 included) to show that the modules hold exactly that many parameters. The
layer/width/head figures are read off the built modules. The attention direction (BERT sees both
sides, GPT only the left) is measured on tiny random models by changing the last token.
"""

from __future__ import annotations

import torch

from nanomm.models import build, count_params, preset
from nanomm.models.params import NOTES_SIZES, human, size_verdict
from nanomm.tour.chapter import Chapter, Claim, TourContext

ID = 2
TITLE = "GPT and BERT: structure and sizes"

# preset -> the notes' structure line (quoted) and what it states: (layers, width, heads or None)
STRUCTURE = {
    "bert-base": ("BERT-base：12 层，768 维，12 头", (12, 768, 12)),
    "bert-large": ("BERT-large：24 层，1024 维，16 头", (24, 1024, 16)),
    "gpt1": ("GPT-1：12 层，768 维，12 头", (12, 768, 12)),
    "gpt2-xl": ("GPT-2：最大 48 层，1600 维", (48, 1600, None)),
    "gpt3-175b": ("GPT-3：96 层，12288 维", (96, 12288, None)),
}
SOURCES = {
    "bert-base": "Devlin et al. 2019 §3; google-research/bert bert_config.json",
    "bert-large": "Devlin et al. 2019 §3",
    "gpt1": "Radford et al. 2018 §4.1; openai-gpt config (vocab 40478, 512 positions)",
    "gpt2-xl": "Radford et al. 2019 Table 2; gpt2-xl config",
    "gpt3-175b": "Brown et al. 2020 Table 2.1",
}
WHAT = {"bert-base": "BertModel with pooler", "bert-large": "BertModel with pooler"}


def _shape_of(model: torch.nn.Module) -> tuple[int, int, int]:
    """(layers, width, heads) read off a built model."""
    core = getattr(model, "bert", model)
    blocks = getattr(core, "layers", None) or getattr(core, "blocks")
    attn = blocks[0].attn
    return len(blocks), attn.q_proj.in_features, attn.n_heads


def _model_claims(name: str) -> tuple[list[Claim], dict[str, float]]:
    config = preset(name)
    model = build(config, device="meta")  # no memory, even for GPT-3's 175B
    built = sum(p.numel() for p in model.parameters())
    analytic = count_params(config).total
    layers, width, heads = _shape_of(model)
    quote, (n_l, n_d, n_h) = STRUCTURE[name]
    structure_ok = (layers, width) == (n_l, n_d) and (n_h is None or heads == n_h)
    notes = NOTES_SIZES[name]
    compared = count_params(config.replace(**notes.compare)).total
    verdict = size_verdict(notes, compared)
    extra = f" ({WHAT[name]}; {analytic:,} with the MLM+NSP heads)" if name in WHAT else ""
    claims = [
        Claim(claim=f"{name}: layers, width, heads", notes=quote,
              nanomm=f"built {name}: {layers} layers, width {width}, {heads} heads",
              verdict="holds" if structure_ok else "wrong", source=SOURCES[name]),
        Claim(claim=f"{name}: parameter count", notes=notes.text,
              nanomm=f"{compared:,}{extra}; built on meta: {built:,} (= analytic: {built == analytic}); "
                     f"the notes' figure is {notes.value / compared - 1:+.2%} off",
              verdict=verdict, source=notes.source),
    ]
    return claims, {f"{name}_params": float(compared), f"{name}_built_equals_analytic": float(built == analytic)}


def _direction(seed: int) -> tuple[Claim, dict[str, float]]:
    """Change the last token; see whether the first position's output moves."""
    torch.manual_seed(seed)
    bert = build(preset("bert-tiny", dropout=0.0, task="base")).eval()
    gpt = build(preset("gpt-tiny")).eval()
    ids = torch.randint(5, 4000, (1, 12))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 4096
    with torch.no_grad():
        d_bert = float((bert(ids).last_hidden_state[0, 0] - bert(changed).last_hidden_state[0, 0]).abs().max())
        d_gpt = float((gpt(ids).logits[0, 0] - gpt(changed).logits[0, 0]).abs().max())
    ok = d_bert > 1e-4 and d_gpt == 0.0
    claim = Claim(claim="BERT attends both ways, GPT only to the left",
                  notes="双向（全看） / 单向（只看左边）",
                  nanomm=f"changing the last token moves BERT's first output by {d_bert:.2e} and GPT's by {d_gpt:.1e}",
                  verdict="holds" if ok else "wrong", source="Devlin et al. 2019 §3; Radford et al. 2018 §3.1")
    return claim, {"bert_first_output_change": d_bert, "gpt_first_output_change": d_gpt}


def _plot(ctx: TourContext, names: list[str], demo: dict[str, float]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [demo[f"{n}_params"] for n in names], 0.4, label="nanomm (exact)")
    ax.bar([x + 0.2 for x in xs], [NOTES_SIZES[n].value for n in names], 0.4, label="the notes")
    ax.set_yscale("log")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("parameters")
    ax.legend()
    fig.tight_layout()
    path = ctx.plot_path("ch02_sizes")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run(ctx: TourContext) -> Chapter:
    names = list(STRUCTURE)
    claims, demo = [], {}
    for name in names:
        c, d = _model_claims(name)
        claims += c
        demo |= d
    claims.append(Claim(claim="GPT-4: about 1.8T parameters, MoE", notes="未公开，估计 1.8T（MoE 架构）",
                        nanomm="nothing to count: no architecture has been published",
                        verdict="unverifiable", source="OpenAI, GPT-4 Technical Report (2023) §2"))
    c, d = _direction(ctx.seed)
    claims.append(c)
    demo |= d
    gpt3 = count_params(preset("gpt3-175b"))
    small = count_params(preset("gpt2"))
    demo |= {"gpt3_fp16_weights_gb": gpt3.total * 2 / 1e9,
             "gpt3_mlp_share": gpt3.breakdown["mlp"] / gpt3.total,
             "gpt2_small_params": float(small.total),
             "gpt2_small_embedding_share": small.breakdown["embeddings"] / small.total}
    rule = {n: 12 * preset(n).n_layer * preset(n).dim ** 2 for n in ("gpt2", "gpt3-175b")}
    lines = [
        "Per layer a transformer holds 4d² + 4d in attention and 2·d·4d + 5d in its MLP: about 12·L·d², "
        f"plus V·d of embeddings. For GPT-3 the rule gives {human(rule['gpt3-175b'])} of the exact "
        f"{human(gpt3.total)}; for GPT-2 small it gives {human(rule['gpt2'])} of {human(small.total)}, "
        f"because its embeddings are {demo['gpt2_small_embedding_share']:.0%} of the model.",
        f"BERT's 110M/340M are the encoder with pooler ({human(demo['bert-base_params'])}, "
        f"{human(demo['bert-large_params'])}); 340M overstates BERT-large by "
        f"{NOTES_SIZES['bert-large'].value / demo['bert-large_params'] - 1:.1%}. GPT-2's 1.5B is the name of its "
        f"largest model ({demo['gpt2-xl_params']:,.0f} counted, the tied head once).",
        f"GPT-3 is built here on the meta device: {human(gpt3.total)} parameters with no memory; its fp16 "
        f"weights alone would take {demo['gpt3_fp16_weights_gb']:.0f} GB.",
        "`nanomm params` prints the full table (every preset, with its breakdown).",
    ]
    return Chapter(claims=claims, demo=demo, lines=lines, plots=[_plot(ctx, names, demo)])
