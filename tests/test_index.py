"""The FAISS layer: every kind and metric, exactness, removal, filters, fallbacks, score conventions."""

from __future__ import annotations

import numpy as np
import pytest

from lookalike import IndexError_, QueryError
from lookalike.index import KINDS, METRICS, IndexWarning, VectorIndex, plan, prepare


def _data(n=3000, d=64, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(40, d)).astype(np.float32)
    x = centers[rng.integers(0, 40, n)] + 0.3 * rng.normal(size=(n, d)).astype(np.float32)
    return x.astype(np.float32), np.arange(100, 100 + n, dtype=np.int64)


def _brute(metric, base, ids, queries, k):
    if metric == "l2":
        d = ((queries[:, None, :] - base[None]) ** 2).sum(-1)
        order = np.argsort(d, axis=1, kind="stable")[:, :k]
        return ids[order], np.take_along_axis(d, order, 1)
    q = prepare(queries, metric)
    s = q @ base.T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return ids[order], np.take_along_axis(s, order, 1)


@pytest.mark.parametrize("metric", METRICS)
def test_flat_is_exact_and_scores_follow_the_conventions(metric):
    x, ids = _data(500)
    base = prepare(x, metric)
    index = VectorIndex.create("flat", metric, base, ids)
    q = x[:20] + 0.01
    scores, distances, got = index.search(q, 10)
    want_ids, want_values = _brute(metric, base, ids, q, 10)
    assert (got == want_ids).mean() > 0.99
    assert np.all(np.diff(scores, axis=1) <= 1e-6), "most similar first"
    if metric == "cosine":
        np.testing.assert_allclose(distances, 1 - scores, atol=1e-6)
        assert scores.max() <= 1 + 1e-5
    elif metric == "ip":
        np.testing.assert_allclose(distances, -scores, atol=1e-6)
    else:
        np.testing.assert_allclose(scores, 1 / (1 + distances), rtol=1e-5)
        np.testing.assert_allclose(np.sort(distances, axis=1), np.sort(want_values, axis=1), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("kind", ["hnsw", "ivf", "ivfpq"])
@pytest.mark.parametrize("metric", METRICS)
def test_approximate_kinds_find_the_exact_neighbours(kind, metric):
    x, ids = _data()
    base = prepare(x, metric)
    index = VectorIndex.create(kind, metric, base, ids)
    assert index.spec.kind == kind and index.spec.chosen_because
    q = x[::60] + 0.05
    _, _, got = index.search(q, 10)
    want, _ = _brute(metric, base, ids, q, 10)
    if kind == "ivfpq":  # compressed codes: the true nearest neighbour is in the top 10 (1-recall@10)
        recall = np.mean([b[0] in a for a, b in zip(got, want)])
    else:
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, want)])
    assert recall >= 0.9, recall
    assert (got >= 100).all(), "never a -1 or unknown id"


@pytest.mark.parametrize("kind", KINDS)
def test_removal_works_for_every_kind_and_k_beyond_the_catalog_returns_all(kind):
    x, ids = _data()
    index = VectorIndex.create(kind, "cosine", prepare(x, "cosine"), ids)
    gone = ids[:50]
    assert index.remove(gone) == 50
    assert len(index) == len(ids) - 50 and index.index.ntotal == len(ids) - 50
    _, _, got = index.search(x[:5], 10)
    assert not np.isin(got, gone).any()
    assert index.remove(gone) == 0
    scores, _, everything = index.search(x[:2], 10**6)
    assert everything.shape == (2, len(ids) - 50) and (everything >= 0).all()
    assert set(everything[0]) == set(ids[50:])


@pytest.mark.parametrize("kind", KINDS)
def test_add_to_every_kind(kind):
    x, ids = _data()
    index = VectorIndex.create(kind, "l2", x[:2000], ids[:2000])
    index.add(x[2000:], ids[2000:])
    assert len(index) == 3000 and index.index.ntotal == 3000
    _, _, got = index.search(x[2500:2510], 1)
    assert (got[:, 0] == ids[2500:2510]).mean() >= 0.9


def test_too_few_vectors_for_ivf_falls_back_to_exact_with_a_warning():
    x, ids = _data(200)
    with pytest.warns(IndexWarning, match="too few"):
        index = VectorIndex.create("ivfpq", "cosine", prepare(x, "cosine"), ids)
    assert index.spec.kind == "flat" and "too few" in index.spec.chosen_because


def test_plan_picks_parameters_from_size():
    small, big = plan("ivf", "cosine", 2000, 1280), plan("ivf", "cosine", 1_000_000, 1280)
    assert small.params["nlist"] * 39 <= 2000 and big.params["nlist"] == 2048
    pq = plan("ivfpq", "l2", 100_000, 1280)
    assert pq.params["m"] == 64 and pq.params["nbits"] == 8


@pytest.mark.parametrize("kind", KINDS)
def test_filter_subset_returns_k_when_k_items_match(kind):
    x, ids = _data()
    index = VectorIndex.create(kind, "cosine", prepare(x, "cosine"), ids)
    subset = ids[7::97]  # 31 items scattered through the index
    _, _, got = index.search(x[:3], 20, subset=subset)
    assert got.shape == (3, 20) and np.isin(got, subset).all()
    _, _, got = index.search(x[:3], 100, subset=subset)
    assert got.shape == (3, len(subset))


def test_bad_queries_are_query_errors():
    x, ids = _data(100)
    index = VectorIndex.create("flat", "cosine", prepare(x, "cosine"), ids)
    for bad in (np.ones(63), np.full(64, np.nan), np.full(64, np.inf), [["a"] * 64]):
        with pytest.raises(QueryError):
            index.search(bad, 5)
    for k in (0, -1, 2.5, True):
        with pytest.raises(QueryError, match="k must be"):
            index.search(x[:1], k)
    with pytest.raises(IndexError_, match="unknown index kind"):
        VectorIndex.create("annoy", "cosine", x, ids)
    with pytest.raises(IndexError_, match="unknown metric"):
        VectorIndex.create("flat", "hamming", x, ids)
