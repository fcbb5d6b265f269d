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


def _pub(loss: float, f1: float, dice: float, diag: float, time_s: float) -> dict[str, Any]:
    return {"loss": loss, "F1": f1, "dice": dice, "diag": diag, "time_s": time_s}


# Every cell of the study's Tables 2 and 4 (../shared/study/published-tables.md):
# last test loss, F1, dice, mean confusion diagonal, training time.
SESSIONS: tuple[Session, ...] = (
    Session("binaire-1", "2", "binary", 1e-4, 8, "16,32,64", True, 25,
            published=_pub(0.58, 0.59, 0.59, 0.82, 2806)),
    Session("binaire-1-2", "2", "binary", 1e-4, 8, "16,32,64", False, 15,
            published=_pub(0.42, 0.51, 0.73, 0.83, 1683)),
    Session("binaire-1-3", "2", "binary", 1e-4, 8, "16,32,64", False, 45,
            published=_pub(0.38, 0.49, 0.73, 0.75, 5051)),
    Session("binaire-1-4", "2", "binary", 1e-4, 8, "16,64,128", True, 25,
            published=_pub(0.34, 0.75, 0.79, 0.83, 6294)),
    Session("binaire-1-5", "2", "binary", 1e-4, 8, "16,32,64,256", True, 25,
            published=_pub(0.34, 0.63, 0.75, 0.81, 28374)),
    Session("multiclass-3", "4", "six", 1e-3, 16, "16,32,64", True, 45,
            published=_pub(0.50, 0.47, 0.47, 0.67, 31200)),
    Session("multiclass-3-2", "4", "six", 1e-3, 16, "16,32,64,128", True, 45,
            published=_pub(0.50, 0.45, 0.52, 0.66, 29958)),
    Session("multiclass-3-3", "4", "six", 1e-3, 16, "16,32,64", False, 45,
            published=_pub(0.85, 0.34, 0.45, 0.43, 11968)),
    Session("multiclass-2", "4", "map", 1e-3, 16, "16,32,64", False, 30,
            class_map=str(CLASSMAPS / "study-5.toml"),
            published=_pub(0.50, 0.49, 0.49, 0.68, 16200)),
    # Shown in the study without its settings: the multiclass ones are assumed.
    Session("multiclass-24", "24", "full", 1e-3, 16, "16,32,64", True, 45,
            published={"F1": 0.09}),
    # Section 5.1; settings not given: the binary ones are assumed.
    Session("unlabeled-binary", "5.1", "unlabeled-binary", 1e-4, 8, "16,32,64", True, 25,
            published={"F1": 0.07, "dice": 0.13}),
)
# What the study did that the suite's preset does not (its text; published-tables.md).
STUDY_SETUP = (
    ("input", "photos resized to 512 x 512 before training",
     lambda r: f"random {_int(r.get('image_size'))} px crops (and flips when augmented)"),
    ("optimizer", "Adam at a constant learning rate",
     lambda r: ", ".join([r.get("optimizer") or "optimizer not recorded",
                          f"{r['schedule']} schedule" if r.get("schedule")
                          else "schedule not recorded",
                          f"{r['lr_scaling']} lr scaling" if r.get("lr_scaling")
                          else "lr scaling not recorded"])),
    ("stopping", "early stopping",
     lambda r: ("early stopping, patience " + _int(r.get("patience")))
     if _pos(r.get("patience")) else "a fixed epoch budget (no early stopping)"),
    ("augmentation", "offline x4 (augmented sessions)",
     lambda r: "online random crops and flips (augmented sessions)"),
    ("test data", "15 % of the 400 Semantic Drone Dataset photos",
     lambda r: (f"{_int(r.get('val_images'))} validation image(s)"
                if _pos(r.get("val_images")) else "validation size not recorded")
     + f" from {r.get('data_source') or 'an unrecorded source'}"),
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


def session_of(run_id: Any) -> str | None:
    """The session a run id reproduces: the session's name, then the parts the grid
    adds (``-w2``, an engine, ``-r1`` for a repeat), never a digit-only part (so
    ``binaire-1-2`` is not ``binaire-1``)."""
    rid = str(run_id or "")
    for s in sorted(SESSIONS, key=lambda x: -len(x.name)):
        if rid == s.name:
            return s.name
        if rid.startswith(s.name + "-") and not rid[len(s.name) + 1:].split("-")[0].isdigit():
            return s.name
    return None


def _int(v: Any) -> str:
    try:
        return str(int(float(v)))
    except (TypeError, ValueError):
        return "?"


def _pos(v: Any) -> bool:
    try:
        return float(v) > 0
    except (TypeError, ValueError):
        return False


def _num(v: Any, spec: str) -> str:
    from segcore.fmt import fmt

    return fmt(v, spec, none="–")


_METRICS = ("val_loss", "F1", "mDice", "mConfDiag", "train_time_s", "epochs")


def _session_rows(d) -> dict[tuple[str, int], dict[str, Any]]:
    """The ok rows of each (session, worker count), repeats reduced: the median of each
    metric, its spread (max - min) and the repeat count ``n``."""
    import statistics

    groups: dict[tuple[str, int], list[Any]] = {}
    for _, r in d.iterrows():
        if r.get("status") != "ok":
            continue
        name = r.get("session") if isinstance(r.get("session"), str) else None
        name = name or session_of(r.get("run_id"))
        if name is None:
            continue
        try:
            world = int(float(r.get("world_size")))
        except (TypeError, ValueError):
            world = 1
        groups.setdefault((name, world), []).append(r)
    out = {}
    for key, rs in groups.items():
        row = dict(rs[0])
        row["n"] = len(rs)
        for m in _METRICS:
            vals = [float(x[m]) for x in rs if _finite(x.get(m))]
            row[m] = statistics.median(vals) if vals else None
            row[f"{m}_spread"] = (max(vals) - min(vals)) if len(vals) > 1 else None
        out[key] = row
    return out


def _finite(v: Any) -> bool:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return False
    return f == f and f not in (float("inf"), float("-inf"))


def _with_spread(r: dict[str, Any], m: str, spec: str) -> str:
    v = _num(r.get(m), spec)
    spread = r.get(f"{m}_spread")
    return v if spread is None else f"{v} ±{format(spread / 2, spec)}"


# A random guess at the truth's own rate: mean confusion diagonal 0.5 and macro Dice of
# both classes 0.5 whatever the positive share p, positive-class F1 = p (0.5 for a median
# split, the unlabeled-binary scheme). The report shows each binary metric beside it.
CHANCE = {"2": {"F1": "p (paved share)", "dice": "0.50", "diag": "0.50"},
          "5.1": {"F1": "0.50", "dice": "0.50", "diag": "0.50"}}


def study_section(d, env: dict[str, Any]) -> list[str]:
    """Report lines: the study's Table 2 and Table 4 (and its other runs) in its columns,
    ours beside its published values, each binary metric beside its chance level, and
    the setup differences. Empty when no row is a study session.

    Rows are found by their ``session`` column (or, in folders from before it, by run
    id), one line per session and worker count, repeats reduced to their median with
    ± half their range and the repeat count.

    Args:
        d: the analysed frame (``segcore.results.analysis.frame``).
        env: the folder's env.json.
    """
    if not len(d) or "run_id" not in d:
        return []
    rows = _session_rows(d)
    if not rows:
        return []
    from segcore.fmt import markdown_table

    src = {str(v) for v in d.get("data_source", []) if isinstance(v, str)}
    data = ", ".join(sorted(src)) or "an unrecorded source (the built-in synthetic scenes " \
        "unless --data was given)"
    synthetic = "synthetic" in src
    lines = ["## The reference study's tables", "",
             f"Ours come from {data}, on the host named above; the study's are its published "
             "values. F1: the positive class's F1 (binary) or the macro F1, which for "
             "several classes is the macro Dice, so multiclass tables show it once; dice: "
             "our mDice over both classes (binary; the study's came from a soft Dice, so "
             "its F1 and dice differ where ours can coincide); diag: mean of the "
             "row-normalized confusion diagonal; test loss: our validation cross-entropy "
             "(the study applied a softmax before it, so scales differ); time: training "
             "seconds. With repeats: the median ± half the range, n repeats. "
             "Definitions: `segcore/results/study.py`.", ""]
    if synthetic:
        lines += ["> **Synthetic data:** these rows measure the code path on the built-in "
                  "synthetic scenes, not the study's photos; their accuracy is not "
                  "comparable with the published values.", ""]
    elif not src:
        lines += ["> **Data source not recorded** (rows from before the `data_source` "
                  "column): their accuracy cannot be compared with the published values.",
                  ""]
    titles = {"2": "Table 2: binary, paved-area vs rest (lr 1e-4, batch 8)",
              "4": "Table 4: multiclass (lr 1e-3, batch 16)",
              "24": "24 classes", "5.1": "Unlabeled binary (section 5.1)"}
    for table, title in titles.items():
        mine = [(s, w) for s in SESSIONS for (name, w) in sorted(rows) if name == s.name
                and s.table == table]
        if not mine:
            continue
        binary = table in CHANCE
        body = []
        for s, w in mine:
            r, p = rows[(s.name, w)], s.published
            f1 = [_with_spread(r, "F1", ".2f"), _num(p.get("F1"), ".2f")]
            dice = ([_with_spread(r, "mDice", ".2f"), _num(p.get("dice"), ".2f")]
                    if binary else [_num(p.get("dice"), ".2f")])
            body.append([s.name, str(w), str(r["n"]), s.widths.replace(",", "-"),
                         "yes" if s.augment else "no",
                         f"{_int(r.get('epochs'))}/{s.epochs}",
                         _num(r.get("num_classes"), ".0f"),
                         _with_spread(r, "val_loss", ".3f"), _num(p.get("loss"), ".2f"),
                         *f1, *dice, _with_spread(r, "mConfDiag", ".2f"),
                         _num(p.get("diag"), ".2f"), _with_spread(r, "train_time_s", ".1f"),
                         _num(p.get("time_s"), ".0f")])
        head = ["session", "workers", "n", "widths", "augmented", "epochs run/study",
                "classes", "test loss", "loss (study)", "F1" if binary else "F1 = dice",
                "F1 (study)", *(["dice", "dice (study)"] if binary else ["dice (study)"]),
                "diag", "diag (study)", "time s", "time s (study)"]
        if binary:
            ch = CHANCE[table]
            body.append(["*chance*", "", "", "", "", "", "", "", "", ch["F1"], ch["F1"],
                         ch["dice"], ch["dice"], ch["diag"], ch["diag"], "", ""])
        lines += [f"### {title}", "", markdown_table(head, body), ""]
        if binary:
            lines += ["*chance*: a random guess at the truth's own positive rate p "
                      "(mean confusion diagonal and two-class Dice 0.50 whatever p; "
                      "positive-class F1 = p" + (", 0.50 for this median split" if
                      table == "5.1" else "") + "). A value near it says the model learned "
                      "nothing the class shares do not give.", ""]
        notes = [f"- {s.name}: {ASSUMED[s.name]}" for s, _ in mine if s.name in ASSUMED]
        lines += notes + ([""] if notes else [])
    first = next(iter(rows.values()))
    lines += ["### How our runs differ from the study's", "",
              markdown_table(["", "the study", "ours"],
                             [[k, theirs, ours(first)] for k, theirs, ours in STUDY_SETUP]),
              ""]
    return lines
