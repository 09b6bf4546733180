"""CLIP trains end to end on the shipped shapes: the loss falls, zero-shot beats chance, the folder loads."""

from __future__ import annotations

import json

import pytest
import torch

from nanomm.data.images import COLOURS, ShapesDataset, save_image
from nanomm.train.objectives_clip import clip_objective
from nanomm.train.recipes_clip import load_clip, train_clip, zero_shot

# a CLIP small enough to train in seconds: colour is learned within tens of steps, shape takes longer
MICRO = {"vision": {"n_layer": 1, "dim": 48, "ff_dim": 96, "n_head": 2},
         "text": {"n_layer": 1, "dim": 48, "ff_dim": 96, "n_head": 2}, "projection_dim": 32}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_clip(tmp_path_factory.mktemp("clip"), data="shapes", steps=100, batch_size=64, n_train=480,
                      lr=3e-3, eval_n=96, model_overrides=MICRO, warmup_steps=5)


def test_loss_decreases(run):
    rows = [json.loads(line) for line in (run.out_dir / "metrics.jsonl").read_text().splitlines()]
    first, last = sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first - 0.5


def test_zero_shot_beats_chance(run):
    m = run.metrics
    assert m["zero_shot_chance"] == m["seen_zero_shot_chance"] == pytest.approx(1 / 24)
    # 100 steps of a micro model: pairs seen in training are classified well above chance among all
    # 24 (observed ≈ 0.2 vs 0.042); their colour, read off the same prediction, ≈ 0.6 vs chance 1/6,
    # whose binomial σ on 96 images is 0.038, so 0.35 is ~5σ above chance
    assert m["seen_zero_shot_accuracy"] > 2 * m["seen_zero_shot_chance"]
    assert m["seen_zero_shot_colour_accuracy"] > 0.35
    # held-out pairs need the text tower to compose words it never saw together: not asserted at this size
    assert 0.0 <= m["zero_shot_accuracy"] <= 1.0 and 0.0 <= m["i2t_R@1"] <= m["i2t_R@5"] <= 1.0


def test_output_folder(run):
    names = {p.name for p in run.out_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "loss.png", "results.json"} <= names
    model, tok, meta = load_clip(run.out_dir)
    assert meta["data"] == "shapes" and len(meta["classes"]) == 24
    assert model.config.text.vocab_size == tok.vocab_size and model.config.text.eos_token_id == tok.eos_id


def test_folder_is_a_transformers_clip(run):
    tf = pytest.importorskip("transformers")
    ours, tok, _ = load_clip(run.out_dir)
    theirs = tf.CLIPModel.from_pretrained(run.out_dir).eval()
    ds = ShapesDataset("test", n=4, image_size=48, seed=9)
    enc = tok.encode_batch(ds.captions)
    with torch.no_grad():
        want = theirs(pixel_values=ds.images(), **enc)
        got = ours(ds.images(), enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(got.text_embeds, want.text_embeds, atol=1e-5, rtol=0)  # float32, 1 layer
    torch.testing.assert_close(got.image_embeds, want.image_embeds, atol=1e-5, rtol=0)


def test_zero_shot_on_a_file(run, tmp_path):
    ds = ShapesDataset("heldout", n=1, image_size=48, seed=4)
    path = save_image(ds.images([0])[0], tmp_path / "shape.png")
    labels = [f"{c} {ds.classes['shape'][int(ds.labels['shape'][0])]}" for c in COLOURS]
    ranked = zero_shot(run.out_dir, path, labels)
    assert sorted(label for label, _ in ranked) == sorted(labels)
    assert sum(p for _, p in ranked) == pytest.approx(1.0, abs=1e-5)
    assert [p for _, p in ranked] == sorted((p for _, p in ranked), reverse=True)
    with pytest.raises(ValueError, match="labels"):
        zero_shot(run.out_dir, path, [])


def test_objective_validates_the_batch(run):
    model, _, _ = load_clip(run.out_dir)
    with pytest.raises(ValueError, match="batch: expected a dict with keys"):
        clip_objective(model, {"pixel_values": torch.zeros(1, 3, 32, 32)})


def test_recipe_validation(tmp_path):
    with pytest.raises(ValueError, match="data"):
        train_clip(tmp_path, data="cifar")
    with pytest.raises(ValueError, match="preset"):
        train_clip(tmp_path, preset="vit-tiny", steps=1)
