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


def _num(v: Any, spec: str) -> str:
    from segcore.fmt import fmt

    return fmt(v, spec, none="–")


def study_section(d, env: dict[str, Any]) -> list[str]:
    """Report lines: the study's Table 2 and Table 4 (and its other runs) in its columns,
    ours beside its published values. Empty when no row is a study session.

    Args:
        d: the analysed frame (``segcore.results.analysis.frame``).
        env: the folder's env.json.
    """
    if not len(d) or "run_id" not in d:
        return []
    rows = {}
    for _, r in d.iterrows():
        rid = str(r.get("run_id") or "")
        s = session(rid)
        if s is not None and r.get("status") == "ok":
            rows[s.name] = r
    if not rows:
        return []
    from segcore.fmt import markdown_table

    src = {str(v) for v in d.get("data_source", []) if isinstance(v, str)}
    data = ", ".join(sorted(src)) or "the built-in synthetic scenes (unless --data was given)"
    lines = ["## The reference study's tables", "",
             f"Ours come from {data}, on the host named above; the study's are its published "
             "values (– where its summary gives none). F1: the positive class's F1 "
             "(binary) or the macro F1; dice: our mDice (the study's came from a soft "
             "Dice, so its F1 and dice differ where ours can coincide); diag: mean of the "
             "row-normalized confusion diagonal; test loss: our validation cross-entropy "
             "(the study applied a softmax before it, so scales differ); time: training "
             "seconds. Definitions: `segcore/results/study.py`.", ""]
    titles = {"2": "Table 2: binary, paved-area vs rest (lr 1e-4, batch 8)",
              "4": "Table 4: multiclass (lr 1e-3, batch 16)",
              "24": "24 classes", "5.1": "Unlabeled binary (section 5.1)"}
    for table, title in titles.items():
        mine = [s for s in SESSIONS if s.table == table and s.name in rows]
        if not mine:
            continue
        body = []
        for s in mine:
            r, p = rows[s.name], s.published
            body.append([s.name, s.widths.replace(",", "-"), "yes" if s.augment else "no",
                         f"{int(r.get('epochs') or 0)}/{s.epochs}",
                         _num(r.get("num_classes"), ".0f"),
                         _num(r.get("val_loss"), ".3f"), _num(r.get("F1"), ".2f"),
                         _num(p.get("F1"), ".2f"), _num(r.get("mDice"), ".2f"),
                         _num(p.get("dice"), ".2f"), _num(r.get("mConfDiag"), ".2f"),
                         _num(p.get("diag"), ".2f"), _num(r.get("train_time_s"), ".1f"),
                         _num(p.get("time_s"), ".0f")])
        lines += [f"### {title}", "", markdown_table(
            ["session", "widths", "augmented", "epochs run/study", "classes", "test loss",
             "F1", "F1 (study)", "dice", "dice (study)", "diag", "diag (study)", "time s",
             "time s (study)"], body), ""]
        notes = [f"- {s.name}: {ASSUMED[s.name]}" for s in mine if s.name in ASSUMED]
        lines += notes + ([""] if notes else [])
    return lines
