"""BM25: scores and rankings equal bm25s's (same tokens, same parameters), rank_bm25 where its formula agrees."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanomm.rag.bm25 import BM25, VARIANTS, top_k

bm25s = pytest.importorskip("bm25s")


def random_corpus(n_docs=120, vocab=60, seed=0):
    """Zipf-distributed words: a few very common terms (df > N/2: negative Robertson idf) and a long tail."""
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(vocab)]
    p = 1.0 / np.arange(1, vocab + 1)
    p /= p.sum()
    return [list(rng.choice(words, size=int(rng.integers(1, 30)), p=p)) for _ in range(n_docs)]


CORPUS = random_corpus()
QUERIES = [["w0"], ["w1", "w7", "w30"], ["w5", "w5", "w12"], ["w59", "w2", "unknown"], ["w3", "w10", "w20", "w40"]]
# float32 weights summed in a different order by the two libraries: a few ulps of the largest score
RTOL = 1e-5


@pytest.mark.parametrize("variant", ["robertson", "lucene", "atire"])
@pytest.mark.parametrize("k1, b", [(1.5, 0.75), (1.2, 0.0), (0.9, 1.0), (0.0, 0.5)])
def test_scores_equal_bm25s(variant, k1, b):
    ours = BM25(k1=k1, b=b, variant=variant).index_tokens(CORPUS)
    ref = bm25s.BM25(method=variant, k1=k1, b=b)
    ref.index(CORPUS, show_progress=False)
    for q in QUERIES:
        np.testing.assert_allclose(ours.get_scores(q), ref.get_scores([t for t in q if t in ref.vocab_dict]),
                                   rtol=RTOL, atol=1e-6)


@pytest.mark.parametrize("variant", ["robertson", "lucene"])
def test_ranking_equals_bm25s(variant):
    ours = BM25(variant=variant).index_tokens(CORPUS)
    ref = bm25s.BM25(method=variant)
    ref.index(CORPUS, show_progress=False)
    queries = [q for q in QUERIES if all(t in ref.vocab_dict for t in q)]
    docs, scores = ref.retrieve(queries, k=10, show_progress=False)
    for q, d, s in zip(queries, docs, scores):
        hits = ours.search(q, k=10)
        np.testing.assert_allclose([sc for _, sc in hits], s[: len(hits)], rtol=RTOL)
        # the same documents at each distinct score (order inside a tie is arbitrary in bm25s)
        rounded = np.round(s, 4)
        for score in set(rounded) - {rounded.min()}:  # a tie at the cut may be broken differently
            assert {i for i, sc in hits if round(sc, 4) == score} == set(d[rounded == score].tolist())


def test_equals_rank_bm25_okapi_up_to_its_epsilon_idf_floor():
    """rank_bm25's BM25Okapi is Robertson's idf with s = k1 + 1, but it replaces a negative idf (df > N/2)
    by epsilon * mean idf where bm25s and nanomm floor it at 0: equal on rare terms, different on common ones."""
    rank_bm25 = pytest.importorskip("rank_bm25")
    k1 = 1.5
    ours = BM25(k1=k1, b=0.75, variant="robertson").index_tokens(CORPUS)
    ref = rank_bm25.BM25Okapi(CORPUS, k1=k1, b=0.75, epsilon=0.25)
    df = {t: sum(t in d for d in CORPUS) for t in ("w0", "w30")}
    assert df["w0"] > len(CORPUS) / 2 > df["w30"]
    np.testing.assert_allclose((k1 + 1) * ours.get_scores(["w30"]), ref.get_scores(["w30"]), rtol=RTOL)
    assert ours.get_scores(["w0"]).max() == 0.0
    np.testing.assert_allclose(ref.get_scores(["w0"]).max() > 0, True)


def test_query_forms_agree():
    bm = BM25(analyzer="english").index(["Retrieval augmented generation.", "Dense retrieval with FAISS.",
                                         "Generation of text."])
    as_text = bm.get_scores("retrieving generation")
    as_tokens = bm.get_scores(["retriev", "gener"])
    as_weights = bm.get_scores({"retriev": 1.0, "gener": 1.0})
    np.testing.assert_array_equal(as_text, as_tokens)
    np.testing.assert_array_equal(as_text, as_weights)
    doubled = bm.get_scores({"retriev": 2.0, "gener": 1.0})
    np.testing.assert_allclose(doubled, as_text + bm.get_scores(["retriev"]), rtol=1e-6)
    assert bm.search("nothing matches zzz", k=3) == []


def test_save_and_load_round_trip(tmp_path):
    bm = BM25(k1=1.2, b=0.6, variant="robertson", analyzer={"name": "english", "stem": False}).index(
        ["the cat sat", "a dog ran", "cats and dogs"])
    bm.save(tmp_path)
    back = BM25.load(tmp_path)
    assert (back.k1, back.b, back.variant, back.analyzer.config) == (1.2, 0.6, "robertson", bm.analyzer.config)
    for q in ("cat", "dogs ran", "cats"):
        np.testing.assert_array_equal(back.get_scores(q), bm.get_scores(q))
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporary files


@settings(max_examples=100, deadline=None)
@given(scores=st.lists(st.sampled_from([0.0, 1.0, 2.0, 2.5, 3.0]), min_size=1, max_size=30), k=st.integers(1, 35))
def test_top_k_is_a_stable_descending_sort(scores, k):
    s = np.asarray(scores, np.float32)
    expected = sorted(range(len(s)), key=lambda i: (-s[i], i))[:k]
    assert top_k(s, k).tolist() == expected


@pytest.mark.parametrize("kwargs, match", [
    ({"k1": -1}, "k1"), ({"b": 1.5}, "b"), ({"variant": "bm25x"}, "variant"), ({"analyzer": "klingon"}, "analyzer"),
])
def test_bad_parameters_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BM25(**kwargs)


def test_bad_inputs_are_rejected():
    bm = BM25().index_tokens([["a"]])
    with pytest.raises(ValueError, match="k: expected"):
        bm.search("a", k=0)
    with pytest.raises(TypeError, match="query"):
        bm.get_scores(3)
    with pytest.raises(ValueError, match="corpus"):
        BM25().index_tokens([])
    assert set(VARIANTS) >= {"robertson", "lucene"}
