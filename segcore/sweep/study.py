"""The reference study's sessions (``--preset paper``) and its published figures.

The study trained a small U-Net on the Semantic Drone Dataset: binary "paved-area vs
rest" (its Table 2, lr 1e-4, batch 8) and multiclass (its Table 4, lr 1e-3, batch 16),
plus a 24-class run and an "unlabeled binary" run made without semantics (its section
5.1). Each session is reproduced under its own name as the run id; its published
figures stand beside ours in the report.

Metric definitions (ours, beside the study's columns):

- ``F1``: the F1 score of hard predictions per class (= per-class Dice of the confusion
  matrix); for a binary scheme the positive class's, otherwise the macro mean over classes
  in the truth or the prediction.
- ``dice``: our ``mDice``, the macro mean of per-class Dice over both classes (binary) or
  all classes. The study's "dice" came from its soft Dice on probabilities, so its F1 and
  dice columns differ where ours can coincide.
- ``diag``: ``mConfDiag``, the mean of the row-normalized confusion diagonal over classes
  in the truth or the prediction (the study's "mean of confusion matrix diagonal").
- ``test loss``: our validation loss (cross-entropy without the study's softmax before
  it), so it is not on the study's scale.
- ``time``: training time in seconds on the machine named in the report.

"Augmented" in the study meant offline augmentation x4 (``launch/prepare.py
--offline-augment 4``); on other data the suite's paired online augmentation (random crop
and flips) stands for it, and the report says which data the rows come from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLASSMAPS = Path(__file__).resolve().parents[2] / "configs" / "classmaps"


@dataclass(frozen=True)
class Session:
    """One of the study's training sessions and what it published (None: not given)."""

    name: str
    table: str  # "2" (binary), "4" (multiclass), "5.1" / "24" (the other runs)
    classes: str
    lr: float
    batch: int
    widths: str
    augment: bool
    epochs: int
    class_map: str | None = None
    published: dict[str, Any] = field(default_factory=dict)


SESSIONS: tuple[Session, ...] = (
    Session("binaire-1", "2", "binary", 1e-4, 8, "16,32,64", True, 25),
    Session("binaire-1-2", "2", "binary", 1e-4, 8, "16,32,64", False, 15),
    Session("binaire-1-3", "2", "binary", 1e-4, 8, "16,32,64", False, 45),
    Session("binaire-1-4", "2", "binary", 1e-4, 8, "16,64,128", True, 25,
            published={"F1": 0.75, "dice": 0.79, "diag": 0.83, "time_s": 6294}),
    Session("binaire-1-5", "2", "binary", 1e-4, 8, "16,32,64,256", True, 25),
    Session("multiclass-3", "4", "six", 1e-3, 16, "16,32,64", True, 45,
            published={"F1": 0.47, "time_s": 31200}),
    Session("multiclass-3-2", "4", "six", 1e-3, 16, "16,32,64,128", True, 45,
            published={"F1": 0.45, "time_s": 29958}),
    Session("multiclass-3-3", "4", "six", 1e-3, 16, "16,32,64", False, 45,
            published={"F1": 0.34, "time_s": 11968}),
    Session("multiclass-2", "4", "map", 1e-3, 16, "16,32,64", False, 30,
            class_map=str(CLASSMAPS / "study-5.toml"),
            published={"F1": 0.49, "time_s": 16200}),
    # Shown in the study without its settings: the multiclass ones are assumed.
    Session("multiclass-24", "24", "full", 1e-3, 16, "16,32,64", True, 45,
            published={"F1": 0.09}),
    # Section 5.1; settings not given: the binary ones are assumed.
    Session("unlabeled-binary", "5.1", "unlabeled-binary", 1e-4, 8, "16,32,64", True, 25,
            published={"F1": 0.07, "dice": 0.13}),
)
ASSUMED = {"multiclass-24": "lr, batch, widths, augmentation and epochs assumed (the "
                            "study's multiclass settings)",
           "unlabeled-binary": "lr, batch, widths, augmentation and epochs assumed (the "
                               "study's binary settings)"}


def preset_rows(epochs: int | None = None) -> list[dict[str, Any]]:
    """The grid rows of ``--preset paper``; ``epochs`` replaces every session's own (a
    short run of the whole study)."""
    return [{"name": s.name, "classes": s.classes, "class_map": s.class_map, "lr": s.lr,
             "batch": s.batch, "widths": s.widths, "augment": s.augment,
             "epochs": epochs or s.epochs} for s in SESSIONS]


def session(name: str) -> Session | None:
    return next((s for s in SESSIONS if s.name == name), None)
