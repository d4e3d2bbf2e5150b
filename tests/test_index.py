"""The FAISS layer: every kind and metric, exactness, removal, filters, fallbacks, score conventions."""

from __future__ import annotations

import numpy as np
import pytest

from lookalike import IndexError_, QueryError
from lookalike.index import (
    EXACT_MAX, KINDS, METRICS, TARGET_RECALL, IndexWarning, VectorIndex, memory_bytes, parse_size, plan, plan_for_memory, prepare,
)


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


@pytest.mark.parametrize("kind", ["hnsw", "ivf", "ivfsq8", "ivfpq"])
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


@pytest.mark.parametrize("kind", KINDS)
def test_whitening_is_learned_at_build_and_applied_to_every_query(kind, tmp_path):
    """The FAISS structure searches PCA-whitened vectors; the exact paths compare the same way."""
    x, ids = _data(3000, 64)
    base = prepare(x, "cosine")
    index = VectorIndex.create(kind, "cosine", base, ids, whiten=16)
    assert index.whiten == 16 and index.spec.params["whiten"] == 16 and "PCA-whitened to 16" in index.spec.chosen_because
    assert index.dim == 64 and index.vectors.shape == (3000, 64)  # the stored vectors stay the model's
    # brute force in the whitened space: PCA (mean removed), eigenvalues ** -1/2, top 16, normalised
    centred = base - base.mean(0)
    values, vecs = np.linalg.eigh(centred.T @ centred / len(base))
    top = np.argsort(values)[::-1][:16]
    w = lambda v: prepare((v - base.mean(0)) @ vecs[:, top] / np.sqrt(values[top]), "cosine")  # noqa: E731
    q = x[:30] + 0.01
    want = np.argsort(-(w(prepare(q, "cosine")) @ w(base).T), axis=1)[:, :5]
    scores, _, got = index.search(q, 5)
    exact = kind in ("flat", "hnsw")  # the IVF kinds probe a part of the lists
    assert (got[:, 0] == ids[want[:, 0]]).mean() >= (0.95 if exact else 0.8)
    coded = kind in ("ivfpq", "ivfsq8")  # codes approximate the vectors, and so the scores
    if not coded:  # the exact path (k covers the catalog) scores as the FAISS structure does
        np.testing.assert_allclose(index.search(q, 3000)[0][:, 0], scores[:, 0], atol=1e-4)
    assert np.all(scores <= 1.0 + (0.02 if coded else 1e-5))
    subset = ids[::7]
    _, _, filtered = index.search(q, 5, subset=subset)
    assert np.isin(filtered, subset).all()
    # the FAISS file carries the learned whitening; removal and additions keep it working
    index.write_faiss(str(tmp_path / "w.faiss"))
    loaded, from_file = VectorIndex.load(index.spec, 64, index.vectors, index.ids, str(tmp_path / "w.faiss"))
    assert from_file and (loaded.search(q, 5)[2] == got).all()
    loaded.remove(ids[:100])
    loaded.add(base[:100], ids[:100])
    assert len(loaded) == 3000 and loaded.search(q[:1], 1)[2][0, 0] == got[0, 0]


def test_whitening_needs_enough_items_and_a_sane_dimension():
    x, ids = _data(100, 64)
    with pytest.warns(IndexWarning, match="needs at least 64 items to learn from, the catalog has 50; not whitened"):
        index = VectorIndex.create("flat", "cosine", prepare(x[:50], "cosine"), ids[:50], whiten=32)
    assert index.whiten == 0 and "whiten" not in index.spec.params
    for bad in (-1, 65, 2.5, True):
        with pytest.raises(IndexError_, match="whiten must be a whole number from 0"):
            plan("flat", "cosine", 100, 64, whiten=bad)
    emptied = VectorIndex.create("hnsw", "cosine", prepare(x, "cosine"), ids, whiten=8)
    emptied.remove(ids)
    assert len(emptied) == 0 and emptied.search(x[:1], 3)[2].shape == (1, 0)
    emptied.add(prepare(x, "cosine"), ids)  # learned again from what it then holds
    assert emptied.search(x[:1], 1)[2][0, 0] == ids[0]


def test_ivf_asked_for_too_early_is_advised_once_the_catalog_is_big_enough():
    rng = np.random.default_rng(0)
    vectors = prepare(rng.standard_normal((600, 32)).astype(np.float32), "cosine")
    with pytest.warns(IndexWarning):
        vindex = VectorIndex.create("ivf", "cosine", vectors, np.arange(600))
    assert vindex.spec.kind == "flat" and vindex.asked_kind == "ivf" and vindex.retrain_advice() is None
    grown = vindex.copy()
    grown.add(prepare(rng.standard_normal((600, 32)).astype(np.float32), "cosine"), np.arange(600, 1200))
    assert len(vindex) == 600, "copy() is independent"
    assert "ivf was asked for" in grown.retrain_advice()
    again = VectorIndex.create(grown.asked_kind, "cosine", grown.vectors, grown.ids)
    assert again.spec.kind == "ivf" and again.spec.params["trained_on"] == 1200


# --- kind auto: a memory budget chooses -----------------------------------------------------------


def test_sizes_parse_in_binary_units_and_nonsense_is_an_index_error():
    assert parse_size("2GB") == parse_size("2 gb") == parse_size("2G") == 2 * 2**30
    assert parse_size("512MB") == 512 * 2**20 and parse_size("1.5GiB") == int(1.5 * 2**30) and parse_size(4096) == 4096
    for bad in ("", "two GB", "-1GB", "0", "2 GBs", "nan GB", "inf", True, -5):
        with pytest.raises(IndexError_, match="expected a size such as 2GB"):
            parse_size(bad)


@pytest.mark.parametrize("n, budget, kind", [
    (10_000, "1GB", "flat"),  # small: exact
    (EXACT_MAX + 1, "1GB", "hnsw"),  # past exact, the graph fits
    (150_000, "750MB", "ivf"),  # the graph (772 MB) does not fit, the vectors (738 MB) do
    (1_000_000, "8GB", "ivf"),  # too many for HNSW's build time
    (1_000_000, "2GB", "ivfsq8"),  # the vectors (4.8 GB) do not fit, their 8-bit codes (1.2 GB) do
    (1_000_000, "1GB", "ivfpq"),  # nor do those
    (10_000, "8MB", "ivfpq"),  # small, but neither exact search nor 8-bit codes fit
])
def test_the_budget_and_the_catalog_size_choose_the_kind(n, budget, kind):
    spec = plan_for_memory("cosine", n, 1280, budget)
    assert spec.kind == kind, spec.chosen_because
    assert memory_bytes(spec.kind, spec.params, n, 1280) <= parse_size(budget)
    assert spec.params["max_memory"] == parse_size(budget)
    said = f"{int(budget[:-2]):.2f} GB" if budget.endswith("GB") else f"{budget[:-2]} MB"
    assert f"of the {said} budget" in spec.chosen_because, spec.chosen_because
    if kind == "ivfpq":  # PCA to 256 dimensions, the longest codes that fit, exact re-ranking
        assert spec.params["pca"] == 256 and spec.params["rerank"] == 10
        longer = dict(spec.params, m=spec.params["m"] * 2)  # codes twice as long (and their tables) would not fit
        assert spec.params["m"] == 64 or memory_bytes("ivfpq", longer, n, 1280) > parse_size(budget)
        assert spec.params["m"] == (64 if n == 1_000_000 else 16)


def test_a_budget_nothing_fits_in_is_an_index_error_that_says_how_much_is_needed():
    with pytest.raises(IndexError_, match=r"1,000,000 vectors of dimension 1280 need at least \d+ MB .* too small"):
        plan_for_memory("cosine", 1_000_000, 1280, "10MB")
    with pytest.raises(IndexError_, match=r"500 vectors of dimension 1280 need 2 MB for exact search; .* too small"):
        plan_for_memory("cosine", 500, 1280, "1MB")
    with pytest.raises(IndexError_, match="needs a memory budget"):
        VectorIndex.create("auto", "cosine", *_data(100))
    with pytest.raises(IndexError_, match="not combined"):
        VectorIndex.create("auto", "cosine", *_data(100), whiten=8, max_memory="1GB")


def _catalog_like(n, d, seed=0):
    """Vectors with the structure of a catalog: many tight groups (products and their variants)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n // 20, d)).astype(np.float32)
    x = centers[rng.integers(0, len(centers), n)] + 0.5 * rng.normal(size=(n, d)).astype(np.float32)
    return prepare(x, "cosine"), np.arange(1, n + 1, dtype=np.int64)


@pytest.mark.parametrize("budget, kind, d", [("1GB", "hnsw", 64), ("10MB", "ivfsq8", 96), ("10MB", "ivfpq", 288)])
def test_auto_tunes_search_to_the_target_recall_and_measures_it_on_held_aside_items(budget, kind, d):
    x, ids = _catalog_like(EXACT_MAX + 2000, d)
    index = VectorIndex.create("auto", "cosine", x, ids, max_memory=budget)
    assert index.spec.kind == kind and index.asked_kind == "auto"
    measured = index.spec.measured
    assert measured["recall_at_10"] >= measured["target"] == TARGET_RECALL + 0.02 and measured["queries"] == 500
    param = "ef_search" if kind == "hnsw" else "nprobe"
    tried = measured[param]  # the ladder stops at the first setting that reaches the target
    assert list(tried.values())[-1] >= measured["target"] > max([0.0] + list(tried.values())[:-1])
    assert str(index.spec.params[param]) == list(tried)[-1] and f"{param} {index.spec.params[param]} reaches" in index.spec.chosen_because
    # the recall measured again, and against exact search on fresh queries, agrees
    assert abs(index.recall() - measured["recall_at_10"]) < 1e-9
    noise = np.random.default_rng(1).normal(size=(300, d)).astype(np.float32) * (0.3 / np.sqrt(d))  # |noise| ~ 0.3
    queries = prepare(x[:300] + noise, "cosine")
    _, _, got = index.search(queries, 10)
    want, _ = _brute("cosine", x, ids, queries, 10)
    fresh = (got[:, :, None] == want[:, None, :]).any(axis=2).mean()
    assert fresh >= TARGET_RECALL - 0.03, fresh
    if kind == "ivfpq":  # re-ranked exactly: the scores are the true cosine similarities
        scores, _, got = index.search(queries[:20], 5)
        np.testing.assert_allclose(scores, np.einsum("qkd,qd->qk", x[got - 1], queries[:20]), atol=1e-5)


def test_a_mapped_faiss_file_opens_fast_and_every_change_goes_to_an_owned_copy(tmp_path):
    x, ids = _data(5000)
    for kind in KINDS:
        built = VectorIndex.create(kind, "cosine", prepare(x, "cosine"), ids)
        path = str(tmp_path / f"{kind}.faiss")
        built.write_faiss(path)
        opened, from_file = VectorIndex.load(built.spec, 64, built.vectors, built.ids, path)
        assert from_file and opened.mapped, kind
        _, _, before = opened.search(x[:5], 5)
        copy = opened.copy()  # FAISS would abort the process on a change to the mapped structure itself
        assert not copy.mapped
        copy.add(prepare(x[:3], "cosine"), np.array([1, 2, 3]))
        copy.remove(np.array([100, 101]))
        assert len(copy) == 5001 and len(opened) == 5000
        opened.remove(np.array([102]))  # in place: it becomes its own first
        opened.add(prepare(x[:1], "cosine"), np.array([7]))
        assert not opened.mapped and len(opened) == 5000
        assert (VectorIndex.load(built.spec, 64, built.vectors, built.ids, path)[0].search(x[:5], 5)[2] == before).all()
