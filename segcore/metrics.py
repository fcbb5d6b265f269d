"""Segmentation metrics from a confusion matrix, and precision-recall from histograms.

Everything is accumulated as integer counts (int64) and only turned into ratios at the
end, so per-batch and per-rank results combine exactly by summing counts — never by
averaging per-batch or per-rank averages, which weights small batches/ranks wrongly.

Conventions (mmsegmentation's names and its rule for the means):

* The confusion matrix ``cm[t, p]`` counts pixels of true class ``t`` predicted as ``p``
  (rows = target, columns = prediction). Pixels whose target is ``ignore_index`` are
  dropped.
* Per class, each metric is a ratio of counts; where its denominator is zero the value
  is NaN (0/0), and every class mean is a NaN-mean, exactly as mmsegmentation's
  ``IoUMetric`` (``np.nanmean`` over ``total_area_to_metrics``). So each mean covers the
  classes its metric is defined for:

  ======================  ==============  =============================================
  per class               NaN when        so the mean leaves out
  ======================  ==============  =============================================
  IoU tp/(T+P-tp)         T + P == 0      classes absent from truth and prediction
  Dice 2tp/(T+P)          T + P == 0      classes absent from truth and prediction
  Acc = Recall tp/T       T == 0          classes absent from the truth
  Precision tp/P          P == 0          classes never predicted
  ======================  ==============  =============================================

  (T: pixels of the class in the truth, P: pixels predicted as it.) A class predicted
  but absent from the truth therefore counts in mIoU and mDice with 0 (it is a false
  positive everywhere), but not in ``mAcc``; a class in the truth that is never
  predicted counts in mIoU, mDice and mAcc with 0, but not in ``mPrecision``.
* ``mAcc == mRecall``: the mean per-class recall over the classes in the truth.
* ``mConfDiag`` is the reference study's "mean of the normalized confusion matrix
  diagonal": the row-normalized diagonal averaged over every class present in the
  truth *or* the prediction, a predicted-only class entering with 0 (its row is
  empty). It equals ``mAcc`` unless some class is predicted but absent from the truth,
  and is then lower (0.610 against an mAcc of 0.763 when four classes are in the truth
  and a fifth is only predicted).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from segcore.dist import all_reduce_sum

__all__ = [
    "confusion_matrix",
    "logits_to_pred",
    "metrics_from_confusion",
    "normalized_confusion",
    "ConfusionMatrix",
    "ProbHistogram",
]


# --------------------------------------------------------------------------- helpers


def _check_labels(target: torch.Tensor, valid: torch.Tensor, num_classes: int,
                  pred: torch.Tensor | None = None) -> None:
    """Raise ValueError if a non-ignored target (or its prediction) is outside [0, C).

    One min/max reduction and a single host sync per call; the slower search for the
    offending values only runs on the error path.
    """
    if target.numel() == 0:
        return
    # 0 is always a legal label, so it is a neutral filler for ignored pixels.
    t = torch.where(valid, target, torch.zeros_like(target))
    stats = [t.min(), t.max()]
    if pred is not None:
        p = torch.where(valid, pred, torch.zeros_like(pred))
        stats += [p.min(), p.max()]
    t_min, t_max, *p_stats = torch.stack(stats).tolist()
    if t_min < 0 or t_max >= num_classes:
        bad = torch.unique(t[(t < 0) | (t >= num_classes)]).tolist()
        raise ValueError(f"target contains label(s) {bad} outside [0, num_classes={num_classes}) "
                         f"that are not ignore_index")
    if p_stats and (p_stats[0] < 0 or p_stats[1] >= num_classes):
        bad = torch.unique(p[(p < 0) | (p >= num_classes)]).tolist()
        raise ValueError(f"pred contains class(es) {bad} outside [0, num_classes={num_classes})")


def _names(num_classes: int, class_names: Sequence[str] | None) -> list:
    if class_names is None:
        return list(range(num_classes))
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class_names given for {num_classes} classes")
    return list(class_names)


# --------------------------------------------------------------------------- functional core


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = 255) -> torch.Tensor:
    """Count (target, prediction) pairs with one ``bincount`` on the inputs' device.

    Args:
        pred: predicted class per pixel, any shape, integer (or bool) dtype.
        target: true class per pixel, same shape as ``pred``, integer dtype.
        num_classes: number of classes C.
        ignore_index: target value whose pixels are left out.

    Returns:
        int64 tensor [C, C] on the inputs' device; ``cm[t, p]`` = pixels of class t
        predicted as p.

    Raises:
        ValueError: shapes differ, or a non-ignored target / its prediction is outside
            [0, C).
        TypeError: floating-point inputs (pass class indices, see :func:`logits_to_pred`).
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    for name, x in (("pred", pred), ("target", target)):
        if x.is_floating_point() or x.is_complex():
            raise TypeError(f"{name} must hold integer class indices, got {x.dtype}")
    n = num_classes
    # int32 indices (n * n + 1 always fits): half the temporary memory of int64 and about
    # twice as fast on CPU for a megapixel batch.
    t = target.reshape(-1).to(torch.int32)
    p = pred.reshape(-1).to(torch.int32)
    valid = t != ignore_index
    _check_labels(t, valid, n, p)
    # Ignored pixels go to an extra overflow bin that is dropped afterwards: avoids a
    # boolean gather, which would force a device->host sync to size its output.
    idx = torch.where(valid, t * n + p, torch.full_like(t, n * n))
    counts = torch.bincount(idx, minlength=n * n + 1)
    return counts[: n * n].reshape(n, n)


def logits_to_pred(logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Turn network outputs into class indices.

    Args:
        logits: [N, C, H, W] raw scores. C == 1 means a binary BCE-with-logits model.
        threshold: probability above which a binary pixel is class 1 (C == 1 only).

    Returns:
        int64 [N, H, W]: ``sigmoid(logits) > threshold`` for C == 1, else argmax over C.
    """
    if logits.dim() < 2:
        raise ValueError(f"logits need a class dimension at dim 1, got shape {tuple(logits.shape)}")
    if logits.shape[1] == 1:
        return (torch.sigmoid(logits) > threshold).long().squeeze(1)
    return logits.argmax(dim=1)


def normalized_confusion(cm: torch.Tensor) -> torch.Tensor:
    """Row-normalise a confusion matrix (each row: distribution of predictions).

    Args:
        cm: [C, C] counts, rows = target.

    Returns:
        float32 [C, C]; rows whose sum is zero stay zero.
    """
    cm = cm.float()
    # clamp keeps empty rows at 0/1 = 0 instead of NaN.
    return cm / cm.sum(dim=1, keepdim=True).clamp(min=1)


def metrics_from_confusion(cm: torch.Tensor,
                           class_names: Sequence[str] | None = None) -> dict[str, float]:
    """Derive the standard segmentation metrics from a confusion matrix.

    Args:
        cm: [C, C] counts, rows = target, columns = prediction.
        class_names: C names for the per-class keys (default: class indices).

    Returns:
        Plain-float dict: ``aAcc``, ``mIoU``, ``mDice``, ``mAcc``, ``mPrecision``,
        ``mRecall``, ``mConfDiag`` and per class ``IoU.<name>``, ``Dice.<name>``,
        ``Precision.<name>``, ``Recall.<name>``. A per-class value whose denominator is
        zero is NaN and left out of its mean (the module docstring has the table);
        a mean over no classes is NaN.
    """
    if cm.dim() != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square [C, C], got {tuple(cm.shape)}")
    names = _names(cm.shape[0], class_names)
    cm = cm.double()  # float64: exact for counts up to 2**53
    tp = cm.diagonal()
    n_true = cm.sum(dim=1)
    n_pred = cm.sum(dim=0)
    present = (n_true + n_pred) > 0
    nan = torch.full_like(tp, float("nan"))

    def ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        # 0/0 is NaN (the metric is undefined for that class and left out of its mean);
        # a class that is there but never right gets 0.
        return torch.where(den > 0, num / den.clamp(min=1), nan)

    iou = ratio(tp, n_true + n_pred - tp)
    dice = ratio(2 * tp, n_true + n_pred)
    precision = ratio(tp, n_pred)
    recall = ratio(tp, n_true)
    # The study's diagonal: every class in truth or prediction, an empty row giving 0.
    conf_diag = torch.where(present, tp / n_true.clamp(min=1), nan)
    total = cm.sum()
    a_acc = (tp.sum() / total) if total > 0 else total.new_tensor(float("nan"))

    per_class = torch.stack([iou, dice, precision, recall, conf_diag])
    means = torch.nanmean(per_class, dim=1)  # NaN when no class qualifies
    # One transfer to host for everything.
    per_class_l, means_l, a_acc_f = per_class.tolist(), means.tolist(), a_acc.item()

    out: dict[str, float] = {
        "aAcc": a_acc_f,
        "mIoU": means_l[0],
        "mDice": means_l[1],
        "mAcc": means_l[3],  # mean recall over the classes in the truth (mmsegmentation)
        "mPrecision": means_l[2],
        "mRecall": means_l[3],
        "mConfDiag": means_l[4],
    }
    for key, values in zip(("IoU", "Dice", "Precision", "Recall"), per_class_l):
        for name, v in zip(names, values):
            out[f"{key}.{name}"] = float(v)
    return out


# --------------------------------------------------------------------------- accumulators


class ConfusionMatrix:
    """Running confusion matrix over batches and ranks.

    Args:
        num_classes: number of classes C.
        ignore_index: target value whose pixels are left out.
        device: where the [C, C] int64 counts live (default CPU). Pass the model's device
            to keep accumulation on the GPU without a per-batch transfer.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255,
                 device: torch.device | str | None = None) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64,
                               device=device if device is not None else "cpu")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch of class indices (see :func:`confusion_matrix`)."""
        cm = confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        self.mat += cm.to(self.mat.device)

    def update_from_logits(self, logits: torch.Tensor, target: torch.Tensor,
                           threshold: float = 0.5) -> None:
        """Add one batch of raw [N, C, H, W] outputs (see :func:`logits_to_pred`)."""
        self.update(logits_to_pred(logits, threshold), target)

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Add another accumulator's counts into this one.

        Returns:
            self, for chaining.
        """
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes}-class counts into "
                             f"{self.num_classes}-class counts")
        self.mat += other.mat.to(self.mat.device)
        return self

    def all_reduce(self) -> None:
        """Sum counts over all ranks in place (no-op without a process group).

        Call once, after the last update: a second call would count everything again.
        """
        all_reduce_sum(self.mat)

    def compute(self, class_names: Sequence[str] | None = None) -> dict[str, float]:
        """Metrics of the counts so far (see :func:`metrics_from_confusion`)."""
        return metrics_from_confusion(self.mat, class_names)

    def reset(self) -> None:
        """Zero the counts."""
        self.mat.zero_()


class ProbHistogram:
    """Per-class histograms of predicted probabilities, for precision-recall curves.

    Memory is ``C * 2 * bins`` counts whatever the pixel count, and the histograms sum
    exactly over batches and ranks. Scores are quantised to ``bins`` equal-width bins on
    [0, 1], so curves and AP are those of the quantised scores.

    Args:
        num_classes: number of classes C (2 for a binary model with one output channel).
        bins: number of probability bins.
        ignore_index: target value whose pixels are left out.
        device: where the counts live (default CPU).
    """

    def __init__(self, num_classes: int, bins: int = 100, ignore_index: int = 255,
                 device: torch.device | str | None = None) -> None:
        if num_classes < 1 or bins < 1:
            raise ValueError(f"num_classes and bins must be >= 1, got {num_classes}, {bins}")
        self.num_classes = num_classes
        self.bins = bins
        self.ignore_index = ignore_index
        # hist[c, 0] = negatives of class c, hist[c, 1] = positives; one tensor so that
        # all_reduce is a single collective.
        self.hist = torch.zeros(num_classes, 2, bins, dtype=torch.int64,
                                device=device if device is not None else "cpu")

    @property
    def pos(self) -> torch.Tensor:
        """[C, bins] counts of pixels of class c by their class-c probability bin."""
        return self.hist[:, 1]

    @property
    def neg(self) -> torch.Tensor:
        """[C, bins] counts of pixels not of class c by their class-c probability bin."""
        return self.hist[:, 0]

    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch.

        Args:
            probs: [N, C, H, W] class probabilities (softmax), or [N, 1, H, W] sigmoid
                probability of class 1 for a binary model (class 0 gets 1 - p).
            target: [N, H, W] true classes.
        """
        if probs.dim() < 2:
            raise ValueError(f"probs need a class dimension at dim 1, got {tuple(probs.shape)}")
        probs = probs.float()  # fp16/bf16 would quantise the scores before we do
        if probs.shape[1] == 1 and self.num_classes == 2:
            probs = torch.cat([1 - probs, probs], dim=1)
        if probs.shape[1] != self.num_classes:
            raise ValueError(f"probs have {probs.shape[1]} channels for "
                             f"{self.num_classes} classes")
        if probs.shape[:1] + probs.shape[2:] != target.shape:
            raise ValueError(f"probs shape {tuple(probs.shape)} does not match target "
                             f"shape {tuple(target.shape)}")
        n, nb = self.num_classes, self.bins
        t = target.reshape(-1).long()
        valid = t != self.ignore_index
        _check_labels(t, valid, n)

        def quantise(p: torch.Tensor) -> torch.Tensor:
            return (p.reshape(-1) * nb).long().clamp_(0, nb - 1)  # p == 1.0 -> top bin

        # Invalid pixels go to an overflow slot that is dropped: no boolean gather/sync.
        t_safe = torch.where(valid, t, 0)
        # Positives: each valid pixel counts once, in its own class at its own score.
        own = quantise(probs.gather(1, t_safe.reshape(target.shape).unsqueeze(1)))
        pos = torch.bincount(torch.where(valid, t_safe * nb + own, n * nb),
                             minlength=n * nb + 1)[: n * nb].reshape(n, nb)
        # Totals per class, one class at a time so transient buffers stay [P], not [C, P].
        total = torch.stack([
            torch.bincount(torch.where(valid, quantise(probs[:, c]), nb), minlength=nb + 1)[:nb]
            for c in range(n)
        ])
        delta = torch.stack([total - pos, pos], dim=1)
        self.hist += delta.to(self.hist.device)

    def merge(self, other: "ProbHistogram") -> "ProbHistogram":
        """Add another accumulator's counts (same classes and bins). Returns self."""
        if (other.num_classes, other.bins) != (self.num_classes, self.bins):
            raise ValueError("cannot merge histograms with different num_classes or bins")
        self.hist += other.hist.to(self.hist.device)
        return self

    def all_reduce(self) -> None:
        """Sum histograms over all ranks in place (no-op without a process group).

        Call once, after the last update: a second call would count everything again.
        """
        all_reduce_sum(self.hist)

    def reset(self) -> None:
        """Zero the counts."""
        self.hist.zero_()

    def pr_curve(self, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Precision-recall curve of class ``c``, thresholds swept from high to low.

        A pixel is predicted positive at threshold ``k / bins`` when its quantised score
        is in bin ``k`` or above.

        Args:
            c: class index.

        Returns:
            ``(precision, recall, thresholds)``, float64 arrays of length ``bins``,
            thresholds descending. Precision is 1 where nothing is predicted positive
            (no false positives); recall is NaN for a class with no positives.
        """
        h = self.hist[c].double().cpu().numpy()
        neg, pos = h[0][::-1], h[1][::-1]  # descending thresholds
        tp = np.cumsum(pos)
        fp = np.cumsum(neg)
        predicted = tp + fp
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = np.where(predicted > 0, tp / np.maximum(predicted, 1), 1.0)
            recall = tp / tp[-1] if tp[-1] > 0 else np.full_like(tp, np.nan)
        thresholds = np.arange(self.bins - 1, -1, -1, dtype=np.float64) / self.bins
        return precision, recall, thresholds

    def average_precision(self, class_names: Sequence[str] | None = None) -> dict:
        """Step-wise AP per class: sum over recall steps of precision (as sklearn).

        Args:
            class_names: C names for the keys (default: class indices).

        Returns:
            ``{name or index: AP}`` as plain floats; NaN for a class with no positives.
        """
        names = _names(self.num_classes, class_names)
        out = {}
        for c, name in enumerate(names):
            precision, recall, _ = self.pr_curve(c)
            if np.isnan(recall[-1]):
                out[name] = float("nan")
                continue
            steps = np.diff(recall, prepend=0.0)
            out[name] = float(np.sum(steps * precision))
        return out

    def roc_curve(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """ROC curve of class ``c`` over the quantised scores, from (0, 0) to (1, 1).

        Returns:
            ``(fpr, tpr)``, float64 arrays of length ``bins + 1`` (thresholds descending,
            the first point predicts nothing positive); NaN where the class has no
            positives (tpr) or no negatives (fpr).
        """
        h = self.hist[c].double().cpu().numpy()
        neg, pos = h[0][::-1], h[1][::-1]
        tp = np.concatenate([[0.0], np.cumsum(pos)])
        fp = np.concatenate([[0.0], np.cumsum(neg)])
        with np.errstate(invalid="ignore", divide="ignore"):
            tpr = tp / tp[-1] if tp[-1] > 0 else np.full_like(tp, np.nan)
            fpr = fp / fp[-1] if fp[-1] > 0 else np.full_like(fp, np.nan)
        return fpr, tpr

    def roc_auc(self, class_names: Sequence[str] | None = None) -> dict:
        """Area under each class's ROC curve (trapezoids; ties within a bin count half,
        as for the exact AUC of tied scores). NaN for a class without positives or
        without negatives."""
        out = {}
        for c, name in enumerate(_names(self.num_classes, class_names)):
            fpr, tpr = self.roc_curve(c)
            out[name] = (float("nan") if np.isnan(fpr[-1]) or np.isnan(tpr[-1])
                         else float(np.trapezoid(tpr, fpr)))
        return out

    def summary(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """AP and AUC per class, their means over classes where defined (``mAP``,
        ``mAUC``), and the curves (``pr``: precision/recall, ``roc``: fpr/tpr per class)
        as lists for ``metrics.json`` and the figures."""
        names = _names(self.num_classes, class_names)
        ap, auc = self.average_precision(names), self.roc_auc(names)
        pr, roc = {}, {}
        for c, name in enumerate(names):
            precision, recall, _ = self.pr_curve(c)
            fpr, tpr = self.roc_curve(c)
            pr[str(name)] = {"precision": precision.tolist(), "recall": recall.tolist()}
            roc[str(name)] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}

        def mean(d: dict) -> float:
            vals = [v for v in d.values() if not math.isnan(v)]
            return float(np.mean(vals)) if vals else float("nan")

        return {"mAP": mean(ap), "mAUC": mean(auc), "AP": ap, "AUC": auc, "pr": pr,
                "roc": roc, "bins": self.bins}
