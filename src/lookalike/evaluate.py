"""Retrieval metrics from ranked relevance: recall@k, precision@1, mAP (pure numpy functions).

``relevant`` is a boolean matrix [n_queries, n_ranked]: relevant[q, r] is True when the item
ranked r-th (0 = most similar) for query q shares its label. ``positives`` is the number of
relevant items each query could have found in the whole gallery (for mAP over the full ranking).
"""

from __future__ import annotations

import numpy as np


def recall_at_k(relevant: np.ndarray, k: int) -> float:
    """Fraction of queries with at least one relevant item in their top k."""
    if len(relevant) == 0:
        return 0.0
    return float(relevant[:, :k].any(axis=1).mean())


def precision_at_1(relevant: np.ndarray) -> float:
    """Fraction of queries whose first result is relevant."""
    if len(relevant) == 0 or relevant.shape[1] == 0:
        return 0.0
    return float(relevant[:, 0].mean())


def average_precisions(relevant: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """Average precision of each query over its ranking (0 for a query with no positives)."""
    relevant = relevant.astype(bool)
    hits = np.cumsum(relevant, axis=1)
    ranks = np.arange(1, relevant.shape[1] + 1)
    precision_at_hits = np.where(relevant, hits / ranks, 0.0)
    positives = np.asarray(positives, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ap = precision_at_hits.sum(axis=1) / positives
    return np.where(positives > 0, ap, 0.0)


def mean_average_precision(relevant: np.ndarray, positives: np.ndarray) -> float:
    """mAP over the queries that have at least one positive in the gallery."""
    positives = np.asarray(positives)
    mask = positives > 0
    if not mask.any():
        return 0.0
    return float(average_precisions(relevant[mask], positives[mask]).mean())


def summarize(relevant: np.ndarray, positives: np.ndarray, ks: list[int]) -> dict[str, float]:
    """recall@k for each k, precision@1 and mAP, with the exact keys the CLI's --json prints."""
    out: dict[str, float] = {f"recall@{k}": recall_at_k(relevant, k) for k in ks}
    out["precision@1"] = precision_at_1(relevant)
    out["mAP"] = mean_average_precision(relevant, positives)
    return out


def per_query(relevant: np.ndarray, positives: np.ndarray, ks: list[int]) -> dict[str, np.ndarray]:
    """Each query's own figures (hit@k as 0/1, precision@1, AP, has-positives), for chunked runs."""
    relevant = relevant.astype(bool)
    out = {f"recall@{k}": relevant[:, :k].any(axis=1).astype(np.float64) for k in ks}
    out["precision@1"] = relevant[:, 0].astype(np.float64) if relevant.shape[1] else np.zeros(len(relevant))
    out["AP"] = average_precisions(relevant, positives)
    out["has_positives"] = np.asarray(positives) > 0
    return out


def combine(chunks: list[dict[str, np.ndarray]], ks: list[int]) -> dict[str, float]:
    """Average per-query figures over all chunks; mAP over queries with a positive."""
    if not chunks:
        return {**{f"recall@{k}": 0.0 for k in ks}, "precision@1": 0.0, "mAP": 0.0}
    joined = {key: np.concatenate([c[key] for c in chunks]) for key in chunks[0]}
    out = {f"recall@{k}": float(joined[f"recall@{k}"].mean()) for k in ks}
    out["precision@1"] = float(joined["precision@1"].mean())
    mask = joined["has_positives"]
    out["mAP"] = float(joined["AP"][mask].mean()) if mask.any() else 0.0
    return out
