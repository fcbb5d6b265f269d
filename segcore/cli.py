"""The command line of a configuration, generated from the :class:`RunConfig` field tree.

Every field is reachable as a dotted override (``--set train.lr=1e-3``; on the sweep also
an axis, ``--axis train.lr=1e-3,3e-3``), typed and checked by the field's own type and
choices, with its default in ``--help``. The everyday flags (``--lr``, ``--batch-size``,
...) are a short alias table over the same paths. Adding a knob means adding a field.

Imports nothing heavy (no torch): both launchers use it before anything starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from segcore.config import (CHOICES, SECTIONS, ConfigError, RunConfig, widths_for_depth)
from segcore.registry import ENGINE_SPECS, LOADER_SPECS

_TRUE = {"true", "on", "yes", "1"}
_FALSE = {"false", "off", "no", "0"}


@dataclass(frozen=True)
class Field:
    """One configuration field: its dotted path, type, default and description."""

    path: str
    kind: type  # int, float, bool, str or tuple (a list of ints)
    optional: bool
    default: Any
    doc: str
    choices: tuple | None = None

    def parse(self, text: str) -> Any:
        """``text`` as this field's value; a bad one raises ConfigError naming the path."""
        t = text.strip()
        if self.optional and t.lower() in ("none", "null", ""):
            return None
        try:
            if self.kind is bool:
                if t.lower() in _TRUE:
                    return True
                if t.lower() in _FALSE:
                    return False
                raise ValueError
            if self.kind is tuple:
                return [int(v) for v in t.split(",") if v.strip()]
            if self.kind is int:
                value: Any = int(t)
            elif self.kind is float:
                value = float(t)
            else:
                value = t
        except ValueError:
            want = {bool: "true or false", tuple: "whole numbers like 16,32,64",
                    int: "a whole number", float: "a number"}.get(self.kind, "a value")
            raise ConfigError(f"{self.path} = {text!r}: expected {want}") from None
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f"{self.path} = {text!r} is not valid; choose one of: "
                              f"{', '.join(map(str, self.choices))}")
        return value


def _kind(hint: Any) -> tuple[type, bool]:
    args = typing.get_args(hint)
    optional = type(None) in args
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is tuple or hint is tuple:
        return tuple, optional
    return hint, optional


def _docs(cls: type) -> dict[str, str]:
    """Attribute descriptions from the class docstring's ``Attributes:`` section."""
    out: dict[str, str] = {}
    name = None
    for line in (cls.__doc__ or "").splitlines():
        s = line.strip()
        head, colon, rest = s.partition(":")
        if colon and head.replace("_", "").replace(" / ", "").isidentifier() and \
                line.startswith(" " * 8) and not line.startswith(" " * 12):
            for n in head.split(" / "):
                out[n.strip()] = rest.strip()
            name = head.split(" / ")[-1].strip()
        elif name and s and line.startswith(" " * 12):
            out[name] += " " + s
        else:
            name = None
    return out


def fields() -> dict[str, Field]:
    """Every configuration field by dotted path (``model.arch`` ... ``run.mode``)."""
    base = RunConfig()
    out: dict[str, Field] = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        docs = _docs(cls)
        obj = getattr(base, section) if section != "run" else base
        for f in dataclasses.fields(cls):
            if section == "run" and f.name in SECTIONS:
                continue
            kind, optional = _kind(hints[f.name])
            path = f"{section}.{f.name}"
            out[path] = Field(path, kind, optional, getattr(obj, f.name),
                              docs.get(f.name, ""), CHOICES.get(path))
    return out


def field(path: str) -> Field:
    """The field at ``path``; an unknown path names the close ones."""
    table = fields()
    if path in table:
        return table[path]
    leaf = path.rpartition(".")[2]
    near = [p for p in table if p.endswith("." + leaf) or leaf in p]
    hint = f"; did you mean {', '.join(near[:4])}?" if near else \
        "; see --help-config for every field"
    raise ConfigError(f"{path!r} is not a configuration field{hint}")


def parse_assignment(item: str, flag: str = "--set") -> tuple[str, str]:
    """``train.lr=1e-3`` -> (path, text); the path is checked."""
    path, eq, text = item.partition("=")
    if not eq or not path.strip():
        raise ConfigError(f"{flag} {item!r}: expected PATH=VALUE, e.g. {flag} train.lr=1e-3")
    path = path.strip()
    field(path)
    return path, text


def assignments(items: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``--set`` items as nested overrides (``{"train": {"lr": 0.001}}``)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        path, text = parse_assignment(item)
        value = field(path).parse(text)
        section, _, name = path.partition(".")
        out.setdefault(section, {})[name] = value
    return out


# ----------------------------------------------------------------------------- aliases


@dataclass(frozen=True)
class Alias:
    """An everyday flag over one field (``--lr`` -> ``train.lr``)."""

    flag: str
    path: str
    help: str = ""
    negate: bool = False  # a store_false switch (--no-augment)


ALIASES: tuple[Alias, ...] = (
    Alias("--data", "data.source", "dataset folder, or 'synthetic'"),
    Alias("--classes", "data.class_scheme", "class scheme"),
    Alias("--class-map", "data.class_map",
          "class fold from a TOML file, e.g. configs/classmaps/study-5.toml (sets --classes "
          "map)"),
    Alias("--unlabeled-threshold", "data.unlabeled_threshold",
          "unlabeled-binary: standardized-gray cut (0.5: the study's code; 0: the mean)"),
    Alias("--pred-threshold", "data.pred_threshold",
          "binary schemes: p > 0.5 (fixed), or each output image's median/mean"),
    Alias("--arch", "model.arch", "U-Net style"),
    Alias("--norm", "model.norm"),
    Alias("--image-size", "data.image_size", "training crop side"),
    Alias("--batch-size", "train.local_batch_size",
          "images per worker per step; the global batch with --strong-scaling"),
    Alias("--epochs", "train.epochs", "accuracy budget in epochs"),
    Alias("--steps", "train.steps", "stop training after N optimizer steps"),
    Alias("--warmup-steps", "train.warmup_steps", "untimed steps before the timed window"),
    Alias("--measure-steps", "train.measure_steps",
          "timed steps after warm-up, whatever the dataset size"),
    Alias("--lr", "train.lr", "learning rate at one worker's batch"),
    Alias("--lr-scaling", "train.lr_scaling", "lr rule for a larger global batch"),
    Alias("--lr-warmup-steps", "train.lr_warmup_steps", "linear lr warm-up steps"),
    Alias("--optimizer", "train.optimizer"),
    Alias("--engine", "train.engine",
          "; ".join(f"{e.name}: {e.help}" for e in ENGINE_SPECS.values())),
    Alias("--zero-stage", "train.zero_stage", "DeepSpeed ZeRO stage"),
    Alias("--deepspeed-config", "train.deepspeed_config",
          "DeepSpeed JSON merged over the generated one"),
    Alias("--loader", "data.loader",
          "; ".join(f"{s.name}: {s.help}" for s in LOADER_SPECS.values())),
    Alias("--decode", "data.decode",
          "where the torch loader decodes training JPEGs: cpu (worker processes) or gpu "
          "(nvJPEG on the CUDA device, batched)"),
    Alias("--precision", "train.precision"),
    Alias("--channels-last", "model.channels_last", "NHWC activations end to end"),
    Alias("--no-channels-last", "model.channels_last", "NCHW", negate=True),
    Alias("--compile", "model.compile", "torch.compile"),
    Alias("--no-augment", "data.augment", "no random crops and flips", negate=True),
    Alias("--loss", "train.loss"),
    Alias("--class-weights", "train.class_weights", "inverse-frequency class weights"),
    Alias("--patience", "train.patience", "early-stop patience in validations (0 = off)"),
    Alias("--monitor", "train.monitor"),
    Alias("--target-miou", "train.target_miou"),
    Alias("--strong-scaling", "train.strong_scaling",
          "--batch-size is the global batch, split over workers"),
    Alias("--sync-bn", "train.sync_bn", "synchronize BatchNorm statistics across workers"),
    Alias("--grad-accum", "train.grad_accum"),
    Alias("--threads", "train.threads", "CPU threads per worker (default cores/workers)"),
    Alias("--num-workers", "data.num_workers", "DataLoader worker processes"),
    Alias("--synthetic-images", "data.synthetic_images"),
    Alias("--strict", "data.strict", "fail on a bad image/mask pair instead of skipping it"),
    Alias("--mode", "run.mode"),
    Alias("--seed", "train.seed"),
    Alias("--save-checkpoints", "train.save_checkpoints",
          "mode throughput: also write last.pt and checkpoint.pt"),
    Alias("--timeout", "train.timeout_s",
          "collective timeout in seconds (a dead peer fails the job)"),
    Alias("--run-id", "run.run_id"),
    Alias("--sweep-id", "run.sweep_id"),
    Alias("--out", "run.out", "output folder"),
)


def _dest(alias: Alias) -> str:
    return alias.path.rpartition(".")[2]  # field names are unique across the sections


def _default_text(f: Field) -> str:
    v = f.default
    if v is None:
        return "unset"
    if isinstance(v, tuple):
        return ",".join(map(str, v))
    return str(v).lower() if isinstance(v, bool) else str(v)


def add_config_arguments(p: argparse.ArgumentParser, skip: Sequence[str] = ()) -> None:
    """The alias flags (each with its field's type, choices and default), ``--depth`` /
    ``--widths``, and ``--set PATH=VALUE`` for every field."""
    table = fields()
    switches: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for a in ALIASES:
        if a.flag in skip:
            continue
        f = table[a.path]
        text = (a.help or f.doc.split(". ")[0]).replace("``", "")
        if f.kind is bool:
            if a.path not in switches:
                switches[a.path] = p.add_mutually_exclusive_group()
            group = switches[a.path]
            default = f" (default: {'on' if f.default else 'off'})"
            group.add_argument(a.flag, dest=_dest(a), default=None,
                               action="store_false" if a.negate else "store_true",
                               help=f"{text} [{a.path}]{default}")
            continue
        metavar = None if f.choices is not None else \
            {int: "N", float: "X"}.get(f.kind, a.path.split(".")[1].upper())
        p.add_argument(a.flag, dest=_dest(a), default=None, metavar=metavar,
                       type=_arg_type(f), choices=f.choices,
                       help=f"{text} [{a.path}] (default: {_default_text(f)})")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--depth", type=int, help="U-Net levels, widths doubling from 16 "
                   "[model.widths] (default: depth 4, 16,32,64,128)")
    g.add_argument("--widths", type=_arg_type(table["model.widths"]),
                   help="channels per level, e.g. 16,32,64 [model.widths]")
    p.add_argument("--set", dest="set_items", action="append", default=[],
                   metavar="PATH=VALUE",
                   help="any configuration field, e.g. --set train.weight_decay=0 (repeat "
                        "it; every field, its type and default: --help-config)")
    p.add_argument("--help-config", action=_HelpConfig, nargs=0,
                   help="list every configuration field with its type and default, and exit")


def _arg_type(f: Field):
    """``f.parse`` as an argparse type: its message, not argparse's "invalid value"."""
    def parse(text: str) -> Any:
        try:
            return f.parse(text)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = f.path
    return parse


class _HelpConfig(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        print(help_config())
        parser.exit()


def help_config() -> str:
    """Every field, its type, choices and default: what ``--set`` and ``--axis`` take."""
    lines = ["Configuration fields (--set PATH=VALUE; on the sweep also --axis PATH=V1,V2):"]
    by_path = {a.path: a.flag for a in ALIASES if not a.negate}
    for f in fields().values():
        kind = {tuple: "ints"}.get(f.kind, f.kind.__name__) + (" | none" if f.optional else "")
        choice = f" {{{','.join(map(str, f.choices))}}}" if f.choices else ""
        alias = f" ({by_path[f.path]})" if f.path in by_path else ""
        lines.append(f"  {f.path:28s} {kind}{choice} = {_default_text(f)}{alias}")
        if f.doc:
            lines.append(f"      {f.doc.replace('``', '')}")
    return "\n".join(lines)


def overrides(a: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The configuration values the flags set, as nested ``{section: {field: value}}``
    (unset flags left out; ``--set`` last, so it wins)."""
    out: dict[str, dict[str, Any]] = {}
    ns = vars(a)
    for alias in ALIASES:
        v = ns.get(_dest(alias))
        if v is not None:
            section, _, name = alias.path.partition(".")
            out.setdefault(section, {})[name] = v
    data, train, model = (out.setdefault(k, {}) for k in ("data", "train", "model"))
    if data.get("class_map") is not None:
        if data.get("class_scheme") not in (None, "map"):
            raise ConfigError(f"--classes {data['class_scheme']} and --class-map "
                              f"{data['class_map']} both choose the classes; give one of them")
        data["class_scheme"] = "map"
    elif data.get("class_scheme") not in (None, "map"):
        data["class_map"] = None  # a named scheme replaces a --config's class map
    if "local_batch_size" in train and train.get("strong_scaling"):
        train["global_batch_size"] = train["local_batch_size"]
    if "arch" in model:
        model["kernel"] = None  # the chosen architecture's default kernel
    if ns.get("depth") is not None:
        model["widths"] = list(widths_for_depth(ns["depth"]))
    if ns.get("widths") is not None:
        model["widths"] = list(ns["widths"])
    for section, values in assignments(ns.get("set_items") or []).items():
        out.setdefault(section, {}).update(values)
    return {k: v for k, v in out.items() if v}
