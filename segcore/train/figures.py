"""Figures of one run: training curves, normalized confusion matrix, sample predictions."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from segcore.data.classes import ClassScheme  # noqa: E402
from segcore.data.classes import IGNORE_INDEX
from segcore.data.dataset import MEAN, STD  # noqa: E402
from segcore.io import save_figure_atomic  # noqa: E402
from segcore.metrics import normalized_confusion  # noqa: E402


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    save_figure_atomic(fig, path)
    plt.close(fig)


def plot_curves(history: list[dict], path: Path) -> None:
    """Train/validation loss and validation mIoU per epoch."""
    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot(ep, [h["train_loss"] for h in history], "o-", label="train loss")
    if any("val_loss" in h for h in history):
        pts = [(h["epoch"], h["val_loss"]) for h in history if "val_loss" in h]
        a.plot(*zip(*pts), "s-", label="validation loss")
        pts = [(h["epoch"], h["mIoU"]) for h in history if "mIoU" in h]
        b.plot(*zip(*pts), "s-", color="C2", label="validation mIoU")
        b.set_ylim(0, 1)
        b.legend()
    a.set(xlabel="epoch", ylabel="loss", title="Loss per epoch")
    a.legend()
    b.set(xlabel="epoch", ylabel="mIoU", title="Validation mIoU per epoch")
    b.grid(alpha=0.3)
    a.grid(alpha=0.3)
    _save(fig, path)


def plot_confusion(cm: torch.Tensor, names, path: Path) -> None:
    """Row-normalized confusion matrix (rows: truth, columns: prediction)."""
    norm = normalized_confusion(cm).numpy()
    n = len(names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * n + 2, 0.45 * n + 2))
    im = ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(n), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    if n <= 12:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true",
           title="Normalized confusion matrix (rows sum to 1)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    _save(fig, path)


def denormalize(x: torch.Tensor) -> np.ndarray:
    """Normalized CHW tensor -> uint8 HWC image."""
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    img = (x.float().cpu() * std + mean).clamp(0, 1)
    return (img.permute(1, 2, 0).numpy() * 255).astype(np.uint8)


@torch.inference_mode()
def plot_samples(model, loader, scheme: ClassScheme, device, channels_last: bool,
                 path: Path, n: int = 4) -> None:
    """Rows of image | truth | prediction | error map for the first ``n`` images."""
    was_training = model.training
    model.eval()
    rows = []
    for x, y in loader:
        xd = x.to(device)
        if channels_last:
            xd = xd.contiguous(memory_format=torch.channels_last)
        pred = scheme.predict(model(xd).float()).cpu()
        for i in range(x.shape[0]):
            rows.append((x[i], y[i], pred[i]))
            if len(rows) >= n:
                break
        if len(rows) >= n:
            break
    model.train(was_training)
    fig, axes = plt.subplots(len(rows), 4, figsize=(12, 2.6 * len(rows)), squeeze=False)
    for r, (img, truth, pred) in enumerate(rows):
        t = truth.numpy()
        p = pred.numpy().astype(np.uint8)
        valid = t != IGNORE_INDEX
        err = np.zeros(t.shape + (3,), np.uint8)
        err[valid & (p != t)] = (220, 30, 30)
        err[valid & (p == t)] = (235, 235, 235)
        tt = np.where(valid, t, 0).astype(np.uint8)
        acc = (p[valid] == t[valid]).mean() if valid.any() else float("nan")
        panels = [(denormalize(img), "image"), (scheme.colorize(tt), "truth"),
                  (scheme.colorize(p), "prediction"), (err, f"errors (acc {acc:.2f})")]
        for c, (im, title) in enumerate(panels):
            axes[r, c].imshow(im)
            axes[r, c].set_title(title, fontsize=9)
            axes[r, c].axis("off")
    _save(fig, path)


def plot_pr_roc(curves: dict, pr_path: Path, roc_path: Path) -> None:
    """Per-class precision-recall (with AP) and ROC (with AUC) curves of the validation
    set, from the fixed-bin score histograms (``ProbHistogram.summary``)."""
    for key, path, (xk, yk), (xl, yl), metric, mean in (
            ("pr", pr_path, ("recall", "precision"), ("recall", "precision"), "AP", "mAP"),
            ("roc", roc_path, ("fpr", "tpr"), ("false positive rate", "true positive rate"),
             "AUC", "mAUC")):
        fig, ax = plt.subplots(figsize=(5.2, 4.4))
        for name, c in curves[key].items():
            x, y = np.asarray(c[xk], dtype=float), np.asarray(c[yk], dtype=float)
            if np.isnan(x).all() or np.isnan(y).all():
                continue  # the class is absent from the validation truth
            ax.plot(x, y, label=f"{name} ({metric} {curves[metric][name]:.2f})", lw=1.4)
        if key == "roc":
            ax.plot([0, 1], [0, 1], ls=":", c="grey", lw=1, label="chance")
        ax.set(xlabel=xl, ylabel=yl, xlim=(0, 1), ylim=(0, 1.02),
               title=f"{mean} {curves[mean]:.3f} over classes (validation, "
                     f"{curves['bins']} score bins)")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7, loc="lower left" if key == "pr" else "lower right")
        _save(fig, path)


def run_figures(out: Path, res, scheme: ClassScheme, model, val_loader, device,
                channels_last: bool) -> None:
    """All figures of one run into ``out``."""
    out = Path(out)
    if res.history:
        plot_curves(res.history, out / "curves.png")
    if res.metrics and res.metrics.get("curves"):
        plot_pr_roc(res.metrics["curves"], out / "pr.png", out / "roc.png")
    if res.confusion is not None:
        plot_confusion(res.confusion, scheme.names, out / "confusion.png")
        plot_samples(model, val_loader, scheme, device, channels_last, out / "samples.png")
