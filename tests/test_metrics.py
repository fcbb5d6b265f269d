"""segcore.metrics against an independent numpy reference on small inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from segcore.metrics import (ConfusionMatrix, ProbHistogram, confusion_matrix, logits_to_pred,
                             metrics_from_confusion, normalized_confusion)

IGNORE = 255


# --------------------------------------------------------------------------- numpy reference


def ref_confusion(pred: np.ndarray, target: np.ndarray, c: int, ignore=IGNORE) -> np.ndarray:
    cm = np.zeros((c, c), np.int64)
    keep = target != ignore
    np.add.at(cm, (target[keep].astype(np.int64), pred[keep].astype(np.int64)), 1)
    return cm


def ref_metrics(cm: np.ndarray) -> dict:
    """mmsegmentation's arithmetic, redone by explicit counting: per-class areas
    (intersection, union, predicted, true), every ratio as numpy's 0/0 = NaN, means as
    ``np.nanmean``. ``mConfDiag``: sklearn-style row-normalized diagonal (an empty row
    gives 0) over the classes seen in truth or prediction."""
    c = cm.shape[0]
    inter = np.array([cm[k, k] for k in range(c)], dtype=np.float64)
    area_true = np.array([sum(cm[k, j] for j in range(c)) for k in range(c)], np.float64)
    area_pred = np.array([sum(cm[j, k] for j in range(c)) for k in range(c)], np.float64)
    union = area_true + area_pred - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou, dice = inter / union, 2 * inter / (area_true + area_pred)
        prec, rec = inter / area_pred, inter / area_true
    seen = [k for k in range(c) if area_true[k] + area_pred[k] > 0]
    diag = [inter[k] / area_true[k] if area_true[k] else 0.0 for k in seen]
    total = cm.sum()

    def mean(v):
        return float(np.nanmean(v)) if (~np.isnan(v)).any() else math.nan

    out = {"aAcc": np.trace(cm) / total if total else math.nan,
           "mIoU": mean(iou), "mDice": mean(dice), "mPrecision": mean(prec),
           "mRecall": mean(rec), "mAcc": mean(rec),
           "mConfDiag": float(np.mean(diag)) if diag else math.nan}
    for k in range(c):
        out.update({f"IoU.{k}": iou[k], f"Dice.{k}": dice[k],
                    f"Precision.{k}": prec[k], f"Recall.{k}": rec[k]})
    return out


def ref_ap(scores: np.ndarray, y: np.ndarray) -> float:
    """Step-wise AP as sklearn: sum over distinct thresholds of (R_n - R_{n-1}) * P_n."""
    if y.sum() == 0:
        return math.nan
    ap, prev_r = 0.0, 0.0
    for thr in np.unique(scores)[::-1]:
        sel = scores >= thr
        tp = np.sum(y & sel)
        r = tp / y.sum()
        ap += (r - prev_r) * tp / sel.sum()
        prev_r = r
    return ap


def quantised(p: np.ndarray, bins: int) -> np.ndarray:
    return np.clip(np.floor(p.astype(np.float32) * np.float32(bins)), 0, bins - 1).astype(int)


def assert_metrics_close(got: dict, want: dict) -> None:
    assert set(want) <= set(got)
    for k, v in want.items():
        assert isinstance(got[k], float), k
        if math.isnan(v):
            assert math.isnan(got[k]), (k, got[k])
        else:
            assert got[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k


def random_batch(seed: int, c: int, shape=(2, 9, 11), p_ignore=0.1):
    rng = np.random.default_rng(seed)
    target = rng.integers(0, c, size=shape)
    # Predictions right ~60% of the time so metrics are not trivially 0 or 1.
    pred = np.where(rng.random(shape) < 0.6, target, rng.integers(0, c, size=shape))
    target[rng.random(shape) < p_ignore] = IGNORE
    return pred, target


# --------------------------------------------------------------------------- confusion matrix


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("c", [2, 5])
def test_random_matches_reference(seed, c):
    pred, target = random_batch(seed, c)
    cm = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), c)
    assert cm.dtype == torch.int64 and cm.shape == (c, c)
    np.testing.assert_array_equal(cm.numpy(), ref_confusion(pred, target, c))
    assert_metrics_close(metrics_from_confusion(cm), ref_metrics(cm.numpy()))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int64])
def test_dtypes_and_any_shape(dtype):
    pred, target = random_batch(7, 4, shape=(3, 5, 2, 4))
    cm = confusion_matrix(torch.from_numpy(pred).to(dtype), torch.from_numpy(target).to(dtype), 4)
    np.testing.assert_array_equal(cm.numpy(), ref_confusion(pred, target, 4))


def test_absent_classes():
    # class 0: correct + missed; class 1: predicted, never true; class 2: true, never
    # predicted; class 3: absent from both.
    target = torch.tensor([0, 0, 0, 2, 2])
    pred = torch.tensor([0, 0, 1, 0, 1])
    m = metrics_from_confusion(confusion_matrix(pred, target, 4))
    for key in ("IoU", "Dice", "Precision", "Recall"):
        assert math.isnan(m[f"{key}.3"])
    assert m["IoU.2"] == m["Dice.2"] == m["Recall.2"] == 0.0  # in target, never predicted
    assert math.isnan(m["Precision.2"])  # never predicted: precision undefined (0/0)
    assert m["IoU.1"] == m["Dice.1"] == m["Precision.1"] == 0.0  # predicted, never true
    assert math.isnan(m["Recall.1"])  # not in the truth: recall undefined (0/0)
    assert m["IoU.0"] == pytest.approx(2 / 4)
    # IoU and Dice average over classes 0..2; Acc (recall) only over those in the truth
    # (0 and 2); precision only over those predicted (0 and 1).
    assert m["mIoU"] == pytest.approx((0.5 + 0 + 0) / 3)
    assert m["mAcc"] == m["mRecall"] == pytest.approx((2 / 3 + 0) / 2)
    assert m["mPrecision"] == pytest.approx((2 / 3 + 0) / 2)
    # The reference study's diagonal keeps the predicted-only class 1 in, with 0.
    assert m["mConfDiag"] == pytest.approx((2 / 3 + 0 + 0) / 3)
    assert m["aAcc"] == pytest.approx(2 / 5)
    assert_metrics_close(m, ref_metrics(confusion_matrix(pred, target, 4).numpy()))


def test_macc_leaves_out_a_class_absent_from_the_truth_as_mmsegmentation_does():
    # Four classes in the truth (recall 1/4, 1, 1, 3/4); class 4 is only ever predicted:
    # it lowers the study's diagonal mean, not mAcc.
    cm = torch.tensor([[1, 0, 0, 0, 3],
                       [0, 4, 0, 0, 0],
                       [0, 0, 4, 0, 0],
                       [0, 0, 0, 3, 1],
                       [0, 0, 0, 0, 0]])
    m = metrics_from_confusion(cm)
    recalls = [1 / 4, 1, 1, 3 / 4]
    assert m["mAcc"] == pytest.approx(sum(recalls) / 4)
    assert m["mConfDiag"] == pytest.approx(sum(recalls) / 5)
    assert m["mConfDiag"] < m["mAcc"]
    assert math.isnan(m["Recall.4"]) and m["IoU.4"] == 0.0
    # Without such a class the two coincide.
    m2 = metrics_from_confusion(cm[:4, :4])
    assert m2["mAcc"] == pytest.approx(m2["mConfDiag"])
    assert_metrics_close(m, ref_metrics(cm.numpy()))


def test_all_one_class():
    t = torch.full((2, 4, 4), 1)
    m = metrics_from_confusion(confusion_matrix(t, t, 3))
    assert m["aAcc"] == m["mIoU"] == m["mDice"] == m["mAcc"] == m["mPrecision"] == 1.0
    assert math.isnan(m["IoU.0"]) and math.isnan(m["IoU.2"]) and m["IoU.1"] == 1.0


def test_ignore_index_dropped_even_with_out_of_range_pred():
    target = torch.tensor([[0, 1, IGNORE], [1, IGNORE, 0]])
    pred = torch.tensor([[0, 1, 99], [0, 7, 0]])  # junk under ignored pixels is fine
    cm = confusion_matrix(pred, target, 2)
    assert cm.tolist() == [[2, 0], [1, 1]]


def test_custom_ignore_index():
    target = torch.tensor([0, -1, 1, -1])
    pred = torch.tensor([0, 1, 1, 0])
    assert confusion_matrix(pred, target, 2, ignore_index=-1).tolist() == [[1, 0], [0, 1]]


def test_all_pixels_ignored():
    target = torch.full((2, 3, 3), IGNORE, dtype=torch.uint8)
    cm = confusion_matrix(torch.zeros_like(target), target, 3)
    assert cm.sum() == 0
    m = metrics_from_confusion(cm)
    assert all(math.isnan(v) for v in m.values())


def test_empty_input():
    e = torch.zeros(0, dtype=torch.long)
    assert confusion_matrix(e, e, 3).sum() == 0


def test_out_of_range_target_raises():
    target = torch.tensor([0, 1, 5, 7, 5, IGNORE])
    with pytest.raises(ValueError, match=r"\[5, 7\].*num_classes=3"):
        confusion_matrix(torch.zeros_like(target), target, 3)
    with pytest.raises(ValueError, match=r"\[-2\]"):
        confusion_matrix(torch.zeros(2, dtype=torch.long), torch.tensor([0, -2]), 3)


def test_out_of_range_pred_raises():
    with pytest.raises(ValueError, match=r"pred.*\[3\].*num_classes=3"):
        confusion_matrix(torch.tensor([0, 3]), torch.tensor([0, 1]), 3)


def test_bad_inputs_raise():
    with pytest.raises(TypeError):
        confusion_matrix(torch.zeros(3), torch.zeros(3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="class_names"):
        metrics_from_confusion(torch.eye(2, dtype=torch.long), ["a"])


def test_class_names_in_keys():
    m = metrics_from_confusion(torch.eye(2, dtype=torch.long) * 3, ["road", "tree"])
    assert m["IoU.road"] == 1.0 and m["Recall.tree"] == 1.0 and "IoU.0" not in m


@pytest.mark.parametrize("seed", range(3))
def test_macc_is_mean_of_normalised_diagonal_over_true_classes(seed):
    pred, target = random_batch(seed, 6, shape=(40,))
    cm = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), 6)
    norm = normalized_confusion(cm)
    assert norm.dtype == torch.float32
    in_truth = cm.sum(1) > 0
    seen = (cm.sum(0) + cm.sum(1)) > 0
    m = metrics_from_confusion(cm)
    assert m["mAcc"] == pytest.approx(norm.diagonal()[in_truth].double().mean().item(),
                                      rel=1e-6)
    assert m["mConfDiag"] == pytest.approx(norm.diagonal()[seen].double().mean().item(),
                                           rel=1e-6)
    assert m["mAcc"] == m["mRecall"]


def test_normalized_confusion_zero_rows_stay_zero():
    cm = torch.tensor([[2, 2], [0, 0]])
    assert normalized_confusion(cm).tolist() == [[0.5, 0.5], [0.0, 0.0]]


@pytest.mark.parametrize("seed", range(3))
def test_dice_is_f1(seed):
    pred, target = random_batch(seed, 4)
    m = metrics_from_confusion(confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), 4))
    for k in range(4):
        p, r = m[f"Precision.{k}"], m[f"Recall.{k}"]
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        assert m[f"Dice.{k}"] == pytest.approx(f1)


# --------------------------------------------------------------------------- accumulator


def test_merge_equals_concatenation():
    (p1, t1), (p2, t2) = random_batch(1, 5), random_batch(2, 5)
    a, b, whole = ConfusionMatrix(5), ConfusionMatrix(5), ConfusionMatrix(5)
    a.update(torch.from_numpy(p1), torch.from_numpy(t1))
    b.update(torch.from_numpy(p2), torch.from_numpy(t2))
    whole.update(torch.from_numpy(np.concatenate([p1, p2])), torch.from_numpy(np.concatenate([t1, t2])))
    assert a.merge(b) is a
    assert torch.equal(a.mat, whole.mat) and a.mat.dtype == torch.int64
    assert_metrics_close(a.compute(), whole.compute())
    with pytest.raises(ValueError, match="merge"):
        a.merge(ConfusionMatrix(4))


def test_several_updates_sum_counts_and_reset():
    acc = ConfusionMatrix(3)
    for seed in range(3):
        p, t = random_batch(seed, 3)
        acc.update(torch.from_numpy(p), torch.from_numpy(t))
    ref = sum(ref_confusion(*random_batch(s, 3), 3) for s in range(3))
    np.testing.assert_array_equal(acc.mat.numpy(), ref)
    acc.reset()
    assert acc.mat.sum() == 0


def test_binary_logits_threshold():
    logits = torch.tensor([-2.0, -0.1, 0.1, 2.0]).reshape(1, 1, 2, 2)
    assert logits_to_pred(logits).tolist() == [[[0, 0], [1, 1]]]
    # sigmoid(0.1) ~ 0.525, sigmoid(2) ~ 0.881
    assert logits_to_pred(logits, threshold=0.6).tolist() == [[[0, 0], [0, 1]]]
    acc = ConfusionMatrix(2)
    acc.update_from_logits(logits, torch.tensor([[[0, 1], [1, 1]]]), threshold=0.6)
    assert acc.mat.tolist() == [[1, 0], [2, 1]]


def test_multiclass_logits_argmax():
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.normal(size=(2, 4, 3, 5)))
    pred = logits_to_pred(logits)
    assert pred.shape == (2, 3, 5)
    np.testing.assert_array_equal(pred.numpy(), logits.numpy().argmax(1))


def test_all_reduce_is_noop_without_process_group():
    assert not torch.distributed.is_initialized()
    acc = ConfusionMatrix(3)
    acc.update(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1]))
    before = acc.mat.clone()
    acc.all_reduce()
    assert torch.equal(acc.mat, before)
    h = ProbHistogram(2, bins=4)
    h.update(torch.tensor([0.2, 0.9]).reshape(1, 1, 1, 2), torch.tensor([[[0, 1]]]))
    hist = h.hist.clone()
    h.all_reduce()
    assert torch.equal(h.hist, hist)


# --------------------------------------------------------------------------- prob histogram


def softmax_np(x: np.ndarray, axis=1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def test_histogram_counts_match_reference():
    rng = np.random.default_rng(3)
    c, bins = 3, 10
    probs = softmax_np(rng.normal(size=(2, c, 6, 7))).astype(np.float32)
    target = rng.integers(0, c, size=(2, 6, 7))
    target[0, 0, :3] = IGNORE
    h = ProbHistogram(c, bins=bins)
    h.update(torch.from_numpy(probs), torch.from_numpy(target))
    keep = target != IGNORE
    for k in range(c):
        q = quantised(probs[:, k][keep], bins)
        y = target[keep] == k
        np.testing.assert_array_equal(h.pos[k].numpy(), np.bincount(q[y], minlength=bins))
        np.testing.assert_array_equal(h.neg[k].numpy(), np.bincount(q[~y], minlength=bins))


def test_ap_well_separated_is_one():
    target = torch.tensor([[[0, 0, 1, 1, 2, IGNORE]]])
    probs = torch.nn.functional.one_hot(target.clamp(max=2), 3).permute(0, 3, 1, 2).float()
    probs = probs * 0.9 + 0.1 / 3  # confident, still a distribution
    probs[0, :, 0, -1] = torch.tensor([1.0, 0.0, 0.0])  # ignored: a top-score false positive
    h = ProbHistogram(3, bins=20)
    h.update(probs, target)
    ap = h.average_precision()
    assert ap == {0: pytest.approx(1.0), 1: pytest.approx(1.0), 2: pytest.approx(1.0)}


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("bins", [7, 50])
def test_ap_matches_exact_on_quantised_scores(seed, bins):
    rng = np.random.default_rng(seed)
    c = 4
    target = rng.integers(0, c, size=(3, 8, 8))
    logits = rng.normal(size=(3, c, 8, 8)) + 1.5 * np.eye(c)[target].transpose(0, 3, 1, 2)
    probs = softmax_np(logits).astype(np.float32)
    h = ProbHistogram(c, bins=bins)
    # Two batches: the histogram must sum them exactly.
    h.update(torch.from_numpy(probs[:1]), torch.from_numpy(target[:1]))
    h.update(torch.from_numpy(probs[1:]), torch.from_numpy(target[1:]))
    ap = h.average_precision()
    for k in range(c):
        want = ref_ap(quantised(probs[:, k].ravel(), bins), target.ravel() == k)
        assert ap[k] == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_ap_binary_single_channel():
    rng = np.random.default_rng(5)
    target = rng.integers(0, 2, size=(2, 10, 10))
    p1 = (1 / (1 + np.exp(-(rng.normal(size=target.shape) + 2 * target - 1)))).astype(np.float32)
    h = ProbHistogram(2, bins=25)
    h.update(torch.from_numpy(p1[:, None]), torch.from_numpy(target))
    ap = h.average_precision(["bg", "fg"])
    assert ap["fg"] == pytest.approx(ref_ap(quantised(p1.ravel(), 25), target.ravel() == 1))
    assert ap["bg"] == pytest.approx(ref_ap(quantised(1 - p1.ravel(), 25), target.ravel() == 0))


def test_ap_random_scores_near_positive_rate():
    rng = np.random.default_rng(11)
    n = 40_000
    target = (rng.random(n) < 0.3).astype(np.int64).reshape(1, 200, 200)
    p1 = rng.random(n).astype(np.float32).reshape(1, 1, 200, 200)
    h = ProbHistogram(2, bins=100)
    h.update(torch.from_numpy(p1), torch.from_numpy(target))
    rate = target.mean()
    assert h.average_precision()[1] == pytest.approx(rate, abs=0.02)


def test_ap_nan_without_positives_and_pr_curve_shape():
    h = ProbHistogram(3, bins=10)
    probs = torch.full((1, 3, 2, 2), 1 / 3)
    h.update(probs, torch.zeros(1, 2, 2, dtype=torch.long))
    ap = h.average_precision()
    assert ap[0] == pytest.approx(1.0) and math.isnan(ap[1]) and math.isnan(ap[2])
    precision, recall, thr = h.pr_curve(0)
    assert precision.shape == recall.shape == thr.shape == (10,)
    assert np.all(np.diff(thr) < 0) and thr[0] == 0.9 and thr[-1] == 0.0
    assert np.all(np.diff(recall) >= 0) and recall[-1] == 1.0


def test_histogram_merge_reset_and_validation():
    rng = np.random.default_rng(2)
    probs = torch.from_numpy(softmax_np(rng.normal(size=(2, 3, 4, 4))).astype(np.float32))
    target = torch.from_numpy(rng.integers(0, 3, size=(2, 4, 4)))
    a, b, whole = (ProbHistogram(3, bins=8) for _ in range(3))
    a.update(probs[:1], target[:1])
    b.update(probs[1:], target[1:])
    whole.update(probs, target)
    assert torch.equal(a.merge(b).hist, whole.hist)
    whole.reset()
    assert whole.hist.sum() == 0
    with pytest.raises(ValueError, match="channels"):
        a.update(probs[:, :2], target)
    with pytest.raises(ValueError, match="num_classes=3"):
        a.update(probs, target + 3)
