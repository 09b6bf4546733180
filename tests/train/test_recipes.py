"""End-to-end pretraining recipes: a few steps each, the output folder is a loadable HF directory."""

import json

import pytest
import torch
from typer.testing import CliRunner

from nanomm.cli import app
from nanomm.models import from_hf
from nanomm.train.objectives import IGNORE_INDEX, token_cross_entropy, unigram_cross_entropy
from nanomm.train.recipes import train_lm, train_mlm


def test_token_cross_entropy_ignores_unlabelled_positions():
    logits = torch.randn(2, 5, 7)
    targets = torch.randint(0, 7, (2, 5))
    targets[0, :3] = IGNORE_INDEX
    loss, acc = token_cross_entropy(logits, targets)
    keep = targets != IGNORE_INDEX
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits[keep], targets[keep]))
    assert acc == (logits[keep].argmax(-1) == targets[keep]).float().mean()
    with pytest.raises(ValueError, match="targets: expected shape"):
        token_cross_entropy(logits, targets[:, :4])


def test_unigram_baseline_is_the_entropy_of_a_known_distribution():
    train = torch.tensor([0] * 5000 + [1] * 5000)  # p = 1/2, 1/2 (add-one smoothing is negligible)
    assert unigram_cross_entropy(train, torch.tensor([0, 1]), 2) == pytest.approx(0.6931, abs=1e-3)


def test_train_lm_writes_a_hugging_face_folder(tmp_path):
    r = train_lm(tmp_path, steps=3, batch_size=2, block_size=32, vocab_size=512, eval_every=0, eval_batches=2)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "loss.png", "results.json"):
        assert (tmp_path / name).exists(), name
    assert r.metrics["steps"] == 3 and r.metrics["unigram_val_loss"] > 0
    model = from_hf(tmp_path)
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 512)
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(hf(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_activation_checkpointing_trains_the_same(tmp_path):
    """Recomputing blocks in backward changes memory, not the numbers."""
    kw = dict(steps=2, batch_size=2, block_size=16, vocab_size=300, eval_every=0, eval_batches=1)
    plain = train_lm(tmp_path / "plain", **kw).metrics
    ckpt = train_lm(tmp_path / "ckpt", activation_checkpointing=True, **kw).metrics
    assert ckpt["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-6)


def test_train_mlm_reports_baselines(tmp_path):
    r = train_mlm(tmp_path, steps=2, batch_size=4, max_seq_length=32, vocab_size=512, eval_every=0)
    m = r.metrics
    assert 0 < m["mlm_frequency_baseline"] < 1 and 0.5 <= m["nsp_majority_baseline"] <= 1
    assert json.loads((tmp_path / "results.json").read_text())["steps"] == 2


@pytest.mark.parametrize("args,message", [
    (["train", "lm", "--out", "X", "--preset", "bert-tiny"], "expected a decoder preset"),
    (["train", "mlm", "--out", "X", "--preset", "llama-tiny"], "expected a BERT preset"),
    (["train", "lm", "--out", "X", "--precision", "fp8"], "precision"),
])
def test_cli_rejects_bad_choices(tmp_path, args, message):
    args = [str(tmp_path / a) if a == "X" else a for a in args]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and message in result.output
