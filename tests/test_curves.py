"""Precision-recall and ROC curves from fixed-bin score histograms (ProbHistogram):
AP and AUC against independent computations, and their place in a training run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from segcore.metrics import ProbHistogram

ROOT = Path(__file__).resolve().parents[1]


def exact_ap(scores: np.ndarray, positive: np.ndarray) -> float:
    """Step-wise average precision over every distinct score (as sklearn's)."""
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], positive[order].astype(float)
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # the end of each tie group
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    precision, recall = tp / (tp + fp), tp / y.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def exact_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney AUC with ties counted half (average ranks)."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    s = scores[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    p, n = positive.sum(), (~positive).sum()
    return float((ranks[positive].sum() - p * (p + 1) / 2) / (p * n))


@pytest.fixture(scope="module")
def scored():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 3, (4, 60, 60), generator=g)
    target[0, :5] = 255  # ignored pixels count nowhere
    logits = torch.randn(4, 3, 60, 60, generator=g) * 1.5
    logits += 1.2 * torch.nn.functional.one_hot(target.clamp(max=2), 3).permute(0, 3, 1, 2)
    return logits.softmax(dim=1), target


def test_ap_and_auc_equal_an_independent_computation_on_the_binned_scores(scored):
    probs, target = scored
    h = ProbHistogram(3, bins=100)
    h.update(probs[:2], target[:2])
    h.update(probs[2:], target[2:])  # batches add up exactly
    ap, auc = h.average_precision(), h.roc_auc()
    valid = (target != 255).reshape(-1)
    for c in range(3):
        p = probs[:, c].reshape(-1)[valid].numpy().astype(np.float64)
        pos = (target.reshape(-1)[valid] == c).numpy()
        binned = np.clip(np.floor(p.astype(np.float32) * 100), 0, 99)
        assert ap[c] == pytest.approx(exact_ap(binned, pos), abs=1e-12)
        assert auc[c] == pytest.approx(exact_auc(binned, pos), abs=1e-12)
        # ... and within 0.01 of the exact values on the raw probabilities
        assert abs(ap[c] - exact_ap(p, pos)) < 0.01
        assert abs(auc[c] - exact_auc(p, pos)) < 0.01
        assert 0.55 < auc[c] < 1.0  # a real signal, not a degenerate case


def test_summary_means_skip_absent_classes_and_binary_heads(scored):
    probs, target = scored
    h = ProbHistogram(4)  # class 3 never occurs: its AP and AUC are NaN, left out
    h.update(torch.cat([probs, torch.zeros_like(probs[:, :1])], dim=1), target)
    s = h.summary(["a", "b", "c", "d"])
    assert np.isnan(s["AP"]["d"]) and np.isnan(s["AUC"]["d"])
    assert s["mAP"] == pytest.approx(np.mean([s["AP"][k] for k in "abc"]))
    assert len(s["roc"]["a"]["fpr"]) == 101 and s["roc"]["a"]["tpr"][-1] == 1.0
    binary = ProbHistogram(2)
    sig = probs[:, 1:2]
    binary.update(sig, (target == 1).long().where(target != 255, target))
    assert binary.summary()["mAUC"] > 0.6


def test_a_run_records_map_and_mauc_and_draws_the_curves(tmp_path):
    out = tmp_path / "run"
    env = {**__import__("os").environ, "SEGBENCH_CACHE": str(tmp_path / "cache")}
    p = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--image-size",
                        "32", "--widths", "8,16", "--synthetic-images", "24", "--epochs",
                        "1", "--measure-steps", "2", "--mode", "accuracy", "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    row = json.loads((out / "result.json").read_text())
    assert 0 <= row["mAP"] <= 1 and 0 <= row["mAUC"] <= 1
    best = json.loads((out / "metrics.json").read_text())["best"]
    assert set(best["curves"]["pr"]) == {"unlabeled", "paved-area", "dirt", "grass", "roof",
                                         "water"}
    assert (out / "pr.png").is_file() and (out / "roc.png").is_file()
