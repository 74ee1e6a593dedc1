"""Retrieval-quality metrics, pure: whether an edited copy finds its source, and how well one threshold
separates "a copy of this photo" from "another photo".

A hit is the source or any photo of its family (near-identical variants of one design: day/night, colours).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


def source_at(ranked: Sequence[Sequence[str]], sources: Sequence[str], k: int) -> float:
    """Share of queries whose top ``k`` ranked families include their source's family."""
    if not sources:
        return float("nan")
    return float(np.mean([source in row[:k] for row, source in zip(ranked, sources)]))


@dataclasses.dataclass(frozen=True)
class Decision:
    threshold: float
    precision: float
    recall: float


def pairs(scores: np.ndarray, query_families: Sequence[str], gallery_families: Sequence[str]
          ) -> tuple[np.ndarray, np.ndarray]:
    """``(positive scores, negative scores)`` over every (query, gallery photo) pair: positive when the photo is
    of the query's family (its source or a variant), negative otherwise."""
    same = np.asarray(query_families)[:, None] == np.asarray(gallery_families)[None, :]
    return scores[same], scores[~same]


def fit_threshold(positives: np.ndarray, negatives: np.ndarray, min_precision: float = 0.99) -> float:
    """The lowest threshold whose precision (score >= threshold counts as "copy") is at least ``min_precision``:
    the most recall at that precision. Without such a threshold, the one of best F1."""
    candidates = np.unique(np.concatenate([positives, negatives]))
    best_f1, best_t = -1.0, float(candidates[-1]) if len(candidates) else 1.0
    for t in candidates:  # ascending: the first that reaches the precision has the most recall
        d = evaluate(positives, negatives, float(t))
        if d.precision >= min_precision:
            return float(t)
        f1 = 2 * d.precision * d.recall / max(d.precision + d.recall, 1e-12)
        if f1 > best_f1:
            best_f1, best_t = f1, float(t)
    return best_t


def evaluate(positives: np.ndarray, negatives: np.ndarray, threshold: float) -> Decision:
    true = int((positives >= threshold).sum())
    false = int((negatives >= threshold).sum())
    precision = true / (true + false) if true + false else 1.0
    recall = true / len(positives) if len(positives) else float("nan")
    return Decision(threshold, precision, recall)


def split_families(families: Sequence[str]) -> tuple[set[str], set[str]]:
    """Two halves of the families, stable across runs and machines (sorted, alternating)."""
    ordered = sorted(set(families))
    return set(ordered[0::2]), set(ordered[1::2])
