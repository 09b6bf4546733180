"""BLIP-2 and LLaVA train through the shared Trainer: losses fall, the recipe writes a model `ask` can use."""

from __future__ import annotations

import json

import pytest
import torch

from nanomm.data.images import ShapesDataset, save_image
from nanomm.models.blip2 import Blip2, set_stage as blip2_stage
from nanomm.models.llava import IGNORE_INDEX, Llava, set_stage as llava_stage
from nanomm.models.multimodal_config import Blip2Config, LlavaConfig, multimodal_preset
from nanomm.train import recipes_vlm as R
from nanomm.train.objectives_blip2 import stage1, stage2
from nanomm.train.objectives import causal_lm
from nanomm.train.objectives_llava import llava_lm
from nanomm.train.trainer import TrainConfig, Trainer


@pytest.fixture(scope="module")
def tok():
    return R.vlm_tokenizer()


SIZE = multimodal_preset("llava-tiny").vision.image_size  # the tiny towers' input size


@pytest.fixture(scope="module")
def shapes():
    return ShapesDataset("train", 16, image_size=SIZE, seed=0)


class _Fixed:
    """The same batch every step: a loss that cannot fall on it means the objective does not train."""

    def __init__(self, batch):
        self.batch = batch

    def __next__(self):
        return self.batch

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def _losses(model, objective, batch, tmp_path, steps=12, lr=3e-3):
    cfg = TrainConfig(steps=steps, lr=lr, min_lr=lr, warmup_steps=0, eval_every=0, save_every=0, log_every=1)
    history = Trainer(model, objective, _Fixed(batch), cfg, tmp_path).fit()
    return [row["loss"] for row in history]


def _teach_lm(lm, tok, texts, tmp_path) -> None:
    lm.requires_grad_(True)
    _losses(lm, causal_lm, next(R.TextBatches(texts, tok, len(texts))), tmp_path / "lm", steps=30, lr=1e-2)
    lm.requires_grad_(False)


def _blip2(tok) -> Blip2:
    c = multimodal_preset("blip2-tiny")
    q = c.qformer.replace(vocab_size=tok.vocab_size, dec_token_id=tok.token_to_id(R.DEC_TOKEN))
    torch.manual_seed(0)
    return Blip2(Blip2Config(vision=c.vision, qformer=q, lm=c.lm.replace(vocab_size=tok.vocab_size), embed_dim=16))


def _llava(tok) -> Llava:
    c = multimodal_preset("llava-tiny")
    torch.manual_seed(0)
    return Llava(LlavaConfig(vision=c.vision, lm=c.lm.replace(vocab_size=tok.vocab_size),
                             image_token_id=tok.token_to_id(R.IMAGE_TOKEN)))


# ----------------------------------------------------------------------------- losses fall

@pytest.mark.parametrize("stage, objective", [("representation", stage1), ("generative", stage2)])
def test_blip2_stage_trains(tok, shapes, tmp_path, stage, objective):
    model = _blip2(tok)
    batch = {"vision_states": R.tower_states(model, shapes)[:8], **tok.encode_batch(shapes.captions[:8])}
    if stage == "generative":  # BLIP-2 freezes a *trained* LM: give it the captions' language first
        _teach_lm(model.lm, tok, shapes.captions[:8], tmp_path)
    blip2_stage(model, stage)
    losses = _losses(model, objective, batch, tmp_path)
    # 12 AdamW steps on one batch: well below the start. Stage 1 starts at several nats (three losses);
    # stage 2 at what the LM cannot tell without the image (colour, shape, place, size), which the
    # prefix then supplies
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("stage, mode", [("pretrain", "caption"), ("finetune", "qa")])
def test_llava_stage_trains(tok, shapes, tmp_path, stage, mode):
    model = _llava(tok)
    batch = next(R.QABatches(shapes, tok, 8, mode, seed=0, states=R.tower_states(model, shapes)))
    if stage == "pretrain":  # the projector alone can only steer an LM that already knows the captions
        _teach_lm(model.lm, tok, shapes.captions[:8], tmp_path)
    llava_stage(model, stage)
    vision = [p.detach().clone() for p in model.vision.parameters()]
    losses = _losses(model, llava_lm, batch, tmp_path)
    assert losses[-1] < 0.8 * losses[0]
    assert all(torch.equal(a, b) for a, b in zip(vision, model.vision.parameters()))  # the tower stays frozen


# ----------------------------------------------------------------------------- data and parsing

def test_qa_batches_label_only_the_answer(tok, shapes):
    b = next(R.QABatches(shapes, tok, 4, "qa", seed=0))
    assert b["pixel_values"].shape == (4, 3, SIZE, SIZE)
    for ids, labels, mask in zip(b["input_ids"], b["labels"], b["attention_mask"]):
        n = int(mask.sum())
        answer = labels[labels != IGNORE_INDEX]
        assert int((ids == tok.token_to_id(R.IMAGE_TOKEN)).sum()) == 1
        assert ids[0] == tok.bos_id and answer[-1] == tok.eos_id and ids[n - 1] == tok.eos_id
        assert torch.equal(answer, ids[n - len(answer):n])  # the labels are the last tokens: the answer


def test_batches_resume(tok, shapes):
    a = R.QABatches(shapes, tok, 4, "qa", seed=3)
    next(a)
    state = a.state_dict()
    want = next(a)
    b = R.QABatches(shapes, tok, 4, "qa", seed=3)
    b.load_state_dict(state)
    got = next(b)
    assert all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize("text, want", [
    ("a small red circle at the top left", ("red", "circle", "top left", "small")),
    ("a large blue cross at the top", ("blue", "cross", "top", "large")),
    ("there is a green square on the right", ("green", "square", "right", None)),
    ("a purple triangle in the center", ("purple", "triangle", "center", None)),
    ("small small at the", (None, None, None, "small")),
])
def test_caption_attributes(text, want):
    got = R.caption_attributes(text)
    assert (got["colour"], got["shape"], got["position"], got["size"]) == want


def test_chance_levels():
    assert R.CHANCE["caption"] == pytest.approx(1 / (6 * 4 * 9 * 2))
    assert R.CHANCE["position"] == pytest.approx(1 / 9)


# ----------------------------------------------------------------------------- the recipe end to end

@pytest.mark.parametrize("family, kwargs", [("llava", {}), ("llava", {"lora": True}), ("blip2", {})])
def test_recipe_writes_a_model_that_answers(tmp_path, family, kwargs):
    opts = R.VlmOptions(n_train=32, n_test=4, batch_size=8, vision_steps=2, vision_batch_size=8, lm_steps=2,
                        stage1_steps=2, stage2_steps=2)
    train = {"llava": R.train_llava, "blip2": R.train_blip2}[family]
    results = train(tmp_path, options=opts, **kwargs)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "results.json"):
        assert (tmp_path / name).is_file()
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(results))
    key = "qa_accuracy" if family == "llava" else "caption"
    assert 0.0 <= results["test"][key] <= 1.0
    image = tmp_path / "scene.png"
    save_image(ShapesDataset("test", 1, image_size=SIZE).images([0])[0], image)
    reply = R.ask(tmp_path, image, "what colour is the shape?")
    assert isinstance(reply, str)
    model, _, meta = R.load_vlm(tmp_path)  # a strict load: LoRA was merged, no adapter weights remain
    assert meta["family"] == family and not model.training
    if kwargs.get("lora"):
        assert 0 < results["trainable"]["finetune"]["lora"] < results["trainable"]["pretrain"]["frozen"]
    with pytest.raises(FileNotFoundError, match="model_dir"):
        R.load_vlm(tmp_path / "missing")
