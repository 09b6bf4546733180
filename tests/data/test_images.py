"""The shipped image sets: determinism, held-out pairs, captions that match the pixels, files in and out."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanomm.data.images import (CLIP_MEAN, CLIP_STD, COLOURS, HELD_OUT, POSITIONS, SHAPES, DigitsDataset, digits_arrays,
                                ImageTextBatches, ShapesDataset, caption_tokenizer, fill_prompt, load_image,
                                render_shape, save_image, shape_captions, to_pil, to_tensor)
from nanomm.models.vision_config import CLIP_MEAN as MODEL_MEAN, CLIP_STD as MODEL_STD


@pytest.fixture(scope="module")
def shapes():
    return {split: ShapesDataset(split, n=96, image_size=32, seed=3) for split in ("train", "test", "heldout")}


@pytest.fixture(scope="module")
def digits():
    return {split: DigitsDataset(split, image_size=16) for split in ("train", "test")}


def test_deterministic_and_prefix_stable():
    a = ShapesDataset("train", n=12, seed=5)
    b = ShapesDataset("train", n=20, seed=5)  # sample i does not depend on n
    c = ShapesDataset("train", n=12, seed=6)
    assert np.array_equal(a.pixels, b.pixels[:12]) and a.captions == b.captions[:12]
    assert not np.array_equal(a.pixels, c.pixels)


def test_held_out_pairs_never_in_training(shapes):
    def pairs(ds):
        return {(ds.classes["colour"][int(c)], ds.classes["shape"][int(s)])
                for c, s in zip(ds.labels["colour"], ds.labels["shape"])}

    assert pairs(shapes["heldout"]) <= set(HELD_OUT)
    for split in ("train", "test"):
        assert not pairs(shapes[split]) & set(HELD_OUT)
    # each colour and each shape of a held-out pair is still seen in training, with other partners
    seen = pairs(shapes["train"])
    assert {c for c, _ in HELD_OUT} <= {c for c, _ in seen} and {s for _, s in HELD_OUT} <= {s for _, s in seen}


def test_captions_name_the_labels(shapes):
    ds = shapes["train"]
    for i in range(10):
        colour = ds.classes["colour"][int(ds.labels["colour"][i])]
        shape = ds.classes["shape"][int(ds.labels["shape"][i])]
        where = POSITIONS[ds.classes["position"][int(ds.labels["position"][i])]][2]
        assert colour in ds.captions[i] and shape in ds.captions[i] and ds.captions[i].endswith(where)
        assert ds.qa(i)[0] == ("what colour is the shape?", colour) and ds.qa(i)[1][1] == shape


@pytest.mark.parametrize("colour", list(COLOURS))
def test_the_shape_is_drawn_in_its_colour_where_the_caption_says(colour):
    # the most saturated pixels are the shape's: their mean colour is the named one, inside the named cell
    img = render_shape("square", colour, "bottom right", "large", 48, np.random.default_rng(0)).astype(float)
    sat = img.max(-1) - img.min(-1)
    ys, xs = np.nonzero(sat > 0.8 * sat.max())
    mean = img[ys, xs].mean(0)
    assert np.abs(mean - np.array(COLOURS[colour])).max() < 40  # box-filtered edges blend a little background
    assert ys.mean() > 32 and xs.mean() > 32


def test_articles():
    assert shape_captions("orange", "circle", "top", "small")[1] == "an orange circle at the top"
    assert fill_prompt("a photo of a {}", "orange cross") == "a photo of an orange cross"
    assert fill_prompt("a photo of a {}", "red cross") == "a photo of a red cross"


def test_digits_are_sklearns():
    from sklearn.datasets import load_digits

    ref = load_digits()
    images, target = digits_arrays()
    assert np.array_equal(images, ref.images) and np.array_equal(target, ref.target)


def test_digits_split_and_captions(digits):
    train, test = digits["train"], digits["test"]
    assert len(train) + len(test) == 1797 and len(test) == round(1797 * 0.2)
    assert not set(train.source_index.tolist()) & set(test.source_index.tolist())
    assert train.images([0, 1]).shape == (2, 3, 16, 16)
    d = int(test.labels["digit"][0])
    assert test.captions[0] == f"a photo of the digit {d}"
    # white paper, dark ink
    assert train.pixels[:, 0, 0].mean() > 200 and train.pixels.min() < 60  # the corner is paper


def test_normalisation_matches_model_constants_and_round_trips():
    assert CLIP_MEAN == MODEL_MEAN and CLIP_STD == MODEL_STD
    px = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    x = to_tensor(px)
    assert x.shape == (2, 3, 5, 7) and x.dtype == torch.float32
    assert np.array_equal(np.asarray(to_pil(x[1])), px[1])


@pytest.mark.parametrize("suffix, exact", [(".png", True), (".jpg", False), (".jpeg", False)])
def test_files_in_and_out(tmp_path, shapes, suffix, exact):
    img = shapes["train"].images([0])[0]
    path = save_image(img, tmp_path / f"x{suffix}")
    back = load_image(path, 32)
    err = (back - img).abs()
    if exact:  # PNG is lossless
        assert float(err.max()) == 0.0
    else:  # JPEG at quality 95 moves pixels by a level or two on average (1 level = 1/255/std ≈ 0.015)
        assert float(err.mean()) < 0.05


def test_load_image_resizes_and_centre_crops(tmp_path):
    wide = np.zeros((20, 60, 3), np.uint8)
    wide[:, 20:40] = 255  # a white centre third
    save_image(wide, tmp_path / "wide.png")
    x = load_image(tmp_path / "wide.png", 10)
    assert x.shape == (3, 10, 10)
    assert float(to_tensor(np.asarray(to_pil(x))).mean()) == pytest.approx(float(x.mean()), abs=1e-2)
    assert np.asarray(to_pil(x)).mean() > 200  # the crop kept the white centre


@settings(max_examples=20, deadline=None)
@given(st.sampled_from(list(COLOURS)), st.sampled_from(list(SHAPES)), st.sampled_from(list(POSITIONS)),
       st.sampled_from(["small", "large"]))
def test_every_caption_encodes_without_unknown_words(colour, shape, position, size):
    tok = _tok()
    for text in shape_captions(colour, shape, position, size):
        ids = tok.encode(text)
        assert tok.unk_id not in ids and ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert tok.decode(ids) == text


_TOK = []


def _tok():
    if not _TOK:
        _TOK.append(caption_tokenizer())
    return _TOK[0]


def test_batches_resume_exactly(shapes):
    tok = _tok()
    a = ImageTextBatches(shapes["train"], tok, 8, seed=1)
    next(a)
    state = a.state_dict()
    want = [next(a) for _ in range(3)]
    b = ImageTextBatches(shapes["train"], tok, 8, seed=1)
    b.load_state_dict(state)
    got = [next(b) for _ in range(3)]
    for x, y in zip(want, got):
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert want[0]["pixel_values"].shape == (8, 3, 32, 32) and want[0]["input_ids"].shape[0] == 8


@pytest.mark.parametrize("kwargs, match", [
    (dict(split="val"), "split"), (dict(n=0), "n:"), (dict(image_size=4), "image_size"),
])
def test_shapes_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ShapesDataset(**kwargs)


def test_file_validation(tmp_path):
    with pytest.raises(ValueError, match="suffix"):
        save_image(np.zeros((4, 4, 3), np.uint8), tmp_path / "x.gif")
    with pytest.raises(FileNotFoundError, match="path"):
        load_image(tmp_path / "missing.png", 8)
    with pytest.raises(ValueError, match="pixels"):
        to_tensor(np.zeros((4, 4, 3), np.float32))
