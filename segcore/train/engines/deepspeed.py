"""DeepSpeed ZeRO engine (stages 0-3, fp32 / bf16 / fp16 with dynamic loss scaling).

The DeepSpeed config is generated from the run config; a user JSON given with
``--deepspeed-config`` is merged on top (nested keys merge, scalars replace), which is
also how DeepSpeed's own timers (``"wall_clock_breakdown": true``) and FLOP profiler
(``"flops_profiler": {"enabled": true, "profile_step": 5}``) are switched on. On a host
without CUDA, ``DS_ACCELERATOR=cpu`` is set before DeepSpeed is imported.

Checkpoints hold full (gathered) model weights, so a ZeRO-3 run's checkpoint loads into
any engine and into prediction. Beside them go DeepSpeed's optimizer state (each rank's
partition, gathered to the primary: moments, fp32 master weights, loss scale), the LR
schedule and DeepSpeed's step counters, so ``--resume`` continues the same trajectory;
a partitioned state resumes on the same number of workers only.

On the CPU, DeepSpeed compiles a C++ communication op (shared-memory collectives) the
first time it runs on a machine, which takes up to about two minutes; the engine says so
before it starts, and how long it took.
"""

from __future__ import annotations

import contextlib
import enum
import inspect
import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from segcore.config import ConfigError, TrainConfig
from segcore.dist import gather_objects
from segcore.precision import DTYPES
from segcore.train.engines.base import Engine, make_optimizer, make_schedule

SHM_OP = "deepspeed_shm_comm"  # DeepSpeed's CPU shared-memory collectives (a C++ op)


def import_deepspeed(device: torch.device):
    """Import DeepSpeed with the right accelerator (CPU when the run is on the CPU)."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as e:
        raise ConfigError(f"engine 'deepspeed' needs the deepspeed package ({e}); "
                          "install it with: pip install deepspeed") from None
    return deepspeed


def shm_op_build_dir(ds_mod) -> Path | None:
    """The folder DeepSpeed compiles its CPU communication op into during
    ``deepspeed.initialize`` (``torch.utils.cpp_extension`` caches it per machine, under
    ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``), or ``None`` when it never
    compiles one here (not on the CPU accelerator, op not usable, installed prebuilt)."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator()._name != "cpu" or not ds_mod.ops.__compatible_ops__.get(SHM_OP):
        return None
    from deepspeed.git_version_info import installed_ops

    if installed_ops.get(SHM_OP):
        return None
    try:
        from torch.utils.cpp_extension import _get_build_directory
        return Path(_get_build_directory(SHM_OP, verbose=False))
    except (ImportError, OSError, TypeError):  # a private helper: its shape may change
        return None


def shm_op_to_build(ds_mod) -> Path | None:
    """:func:`shm_op_build_dir` when no compiled op is there yet (a first build)."""
    folder = shm_op_build_dir(ds_mod)
    return None if folder is None or (folder / f"{SHM_OP}.so").is_file() else folder


BUILD_NOTICE = (f"DeepSpeed: compiling its CPU communication op ({SHM_OP}: shared-memory "
                "collectives between the workers of a machine); this happens once per "
                "machine (and again when another environment, another torch or Python, "
                "built it last) and takes up to ~2 minutes (42-128 s measured on 2 cores); "
                "later runs reuse {folder}")


@contextlib.contextmanager
def build_watch(folder: Path | None, log: Callable[[str], None], said: bool = False,
                poll_s: float = 0.5) -> Iterator[list[bool]]:
    """Say so when a build of the op starts in ``folder`` while the block runs: torch's
    extension builder holds a ``lock`` file there while it compiles, which a rebuild
    (the op left by another environment) does without any other sign. ``said``: the
    notice was given already (a first build, known in advance). Yields ``[built]``:
    whether a build was announced (in advance or by the watch)."""
    announced = [said]
    if folder is None or said:
        yield announced
        return
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(poll_s):
            if (folder / "lock").exists():
                log(BUILD_NOTICE.format(folder=folder))
                announced[0] = True
                return

    t = threading.Thread(target=watch, name="segbench-ds-build-watch", daemon=True)
    t.start()
    try:
        yield announced
    finally:
        stop.set()
        t.join()


def _plain(state: Any) -> Any:
    """A DeepSpeed optimizer state dict that ``torch.load(weights_only=True)`` reads:
    tensors on the CPU, enums as their values, the loss scaler as its numeric
    attributes; the parameter slice map (only for DeepSpeed's universal checkpoints)
    is dropped."""
    if isinstance(state, torch.Tensor):
        return state.detach().cpu()
    if isinstance(state, enum.Enum):
        return state.value
    if isinstance(state, dict):
        return {k: _plain(v) for k, v in state.items() if k != "param_slice_mappings"}
    if isinstance(state, (list, tuple)):
        return type(state)(_plain(v) for v in state)
    if hasattr(state, "cur_scale"):  # DeepSpeed's LossScaler / DynamicLossScaler
        return {"__ds_loss_scaler__": {k: v for k, v in vars(state).items()
                                if isinstance(v, (bool, int, float, str, type(None)))}}
    return state


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: ``over`` wins; nested dicts merge key by key."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def make_ds_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON for a run config (user file merged on top)."""
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.per_worker_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "zero_optimization": {"stage": cfg.zero_stage,
                              "stage3_gather_16bit_weights_on_model_save": True},
        "steps_per_print": 10 ** 9,  # our Trainer prints progress
        # ZeRO partitions any torch optimizer's state; DeepSpeed only lists Adam-family
        # ones as tested and refuses SGD without this.
        "zero_allow_untested_optimizer": True,
        # No clipping, as in the single and DDP engines (recent DeepSpeed releases clip
        # at norm 1.0 by default, which silently changes the optimisation).
        "gradient_clipping": 0.0,
        "wall_clock_breakdown": False,
    }
    ds["train_batch_size"] = ds["train_micro_batch_size_per_gpu"] * cfg.grad_accum * world_size
    if cfg.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif cfg.precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    if cfg.deepspeed_config:
        path = Path(cfg.deepspeed_config)
        if not path.is_file():
            raise ConfigError(f"--deepspeed-config {path} does not exist")
        try:
            user = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"--deepspeed-config {path} is not valid JSON: {e}") from None
        ds = merge(ds, user)
    return ds


class DeepSpeedEngine(Engine):
    """``deepspeed.initialize`` around the model with our optimizer and LR schedule."""

    name = "deepspeed"
    # Inputs follow the NCHW weights (below); the Trainer reads this, the row records it.
    channels_last = False

    def __init__(self, model: nn.Module, cfg: TrainConfig, device: torch.device,
                 total_steps: int, log: Callable[[str], None] | None = None) -> None:
        log = log or (lambda _msg: None)
        ds_mod = import_deepspeed(device)
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        if world == 1:
            # A plain `python launch/train.py` (a 1-process group, no launcher): DeepSpeed
            # asserts that LOCAL_RANK is set, and reads its device index from it.
            os.environ.setdefault("LOCAL_RANK", "0")
        self.ds_config = make_ds_config(cfg, world)
        self.cfg, self.device = cfg, device
        # DeepSpeed broadcasts and flattens parameters through byte views, which need
        # contiguous tensors: keep the weights NCHW, and the inputs too, or every
        # convolution would convert between the two layouts.
        model = model.to(memory_format=torch.contiguous_format)
        optimizer = make_optimizer(model.parameters(), cfg, device)
        scheduler = make_schedule(optimizer, cfg, total_steps)
        build_dir = shm_op_to_build(ds_mod)
        if build_dir is not None:
            log(BUILD_NOTICE.format(folder=build_dir))
        t0 = time.perf_counter()
        with build_watch(shm_op_build_dir(ds_mod), log,
                         said=build_dir is not None) as built:
            engine, self.optimizer, _, self.scheduler = ds_mod.initialize(
                model=model, optimizer=optimizer, lr_scheduler=scheduler,
                config=self.ds_config, dist_init_required=False)
        if built[0]:
            log(f"DeepSpeed: communication op ready ({time.perf_counter() - t0:.0f} s)")
        self.model = engine
        # The bare module under torch.compile: state dicts without "_orig_mod." keys.
        self.module = getattr(engine.module, "_orig_mod", engine.module)
        self._ds = ds_mod
        self._in_accum = False
        # DeepSpeed casts the weights for bf16/fp16; inputs must follow, and so must
        # BatchNorm's running statistics (buffers, which DeepSpeed leaves in fp32: batch
        # norm then fails with "expected scalar type BFloat16 but found Float").
        self.input_dtype = None if cfg.precision == "fp32" else DTYPES[cfg.precision]
        if self.input_dtype is not None:
            for m in self.module.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    for name in ("running_mean", "running_var"):
                        buf = getattr(m, name)
                        if buf is not None and buf.dtype != self.input_dtype:
                            setattr(m, name, buf.to(self.input_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_dtype is not None:
            x = x.to(self.input_dtype)
        return self.model(x)

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)  # DeepSpeed scales by 1/grad_accum itself
        if self._in_accum:
            self.model.step()  # not a boundary: DeepSpeed only counts the micro-batch

    def step(self) -> None:
        self.model.step()  # at the accumulation boundary: optimizer, zero_grad, LR schedule

    @contextlib.contextmanager
    def accumulate(self):
        self._in_accum = True
        try:
            yield
        finally:
            self._in_accum = False

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    @property
    def lr(self) -> float:
        return float(self.model.get_lr()[0])

    @contextlib.contextmanager
    def evaluation(self):
        # ZeRO-3 partitions the weights; gather them once for the whole validation
        # (every rank enters together). Its forward hooks still issue collectives (it
        # records and checks the module order), so the Trainer gives every rank the
        # same number of forwards.
        self.module.eval()
        try:
            with self._gathered():
                yield self._eval_forward
        finally:
            self.module.train()

    def _eval_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_dtype is not None:
            x = x.to(self.input_dtype)
        return self.module(x)

    def _gathered(self, modifier_rank=None):
        if self.cfg.zero_stage == 3:
            return self._ds.zero.GatheredParameters(list(self.module.parameters()),
                                                    modifier_rank=modifier_rank)
        return contextlib.nullcontext()

    def model_state_dict(self) -> dict[str, Any]:
        # Every rank must enter the gather (it is a collective under ZeRO-3).
        with self._gathered():
            return {k: v.detach().float().clone() if v.is_floating_point() else v.clone()
                    for k, v in self.module.state_dict().items()}

    @property
    def _partitioned(self) -> bool:
        """Each rank holds its own share of the optimizer state (ZeRO-1/2/3 and
        DeepSpeed's bf16 optimizer take the list of every rank's state on load)."""
        params = list(inspect.signature(self.optimizer.load_state_dict).parameters)
        return bool(params) and params[0] == "state_dict_list"

    def state_dict(self) -> dict[str, Any]:
        """Full weights, plus the optimizer state of every rank (on the primary; the
        others' copy is not written), the LR schedule and DeepSpeed's counters. Every
        rank must call it: the weight gather and the state gather are collectives."""
        sd: dict[str, Any] = {"model": self.model_state_dict()}
        mine = _plain(self.optimizer.state_dict())
        sd["optimizer_shards"] = gather_objects(mine) if self._partitioned else [mine]
        if self.scheduler is not None:
            sd["scheduler"] = self.scheduler.state_dict()
        sd["zero_stage"] = self.cfg.zero_stage
        sd["counters"] = {k: int(getattr(self.model, k)) for k in
                          ("global_steps", "global_samples", "skipped_steps")}
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        with self._gathered(modifier_rank=0):
            own = self.module.state_dict()
            self.module.load_state_dict({k: v.to(own[k].dtype) for k, v in sd["model"].items()})
        shards = sd.get("optimizer_shards")
        if shards is None:
            # Weights only (a checkpoint from before optimizer state was saved): the
            # optimizer's fp32 master copy must follow them, or its first step would
            # write the old weights back.
            if hasattr(self.optimizer, "refresh_fp32_params"):
                self.optimizer.refresh_fp32_params()
            return
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        if self._partitioned and (len(shards) != world
                                  or sd.get("zero_stage") != self.cfg.zero_stage):
            raise ConfigError(
                f"the checkpoint holds DeepSpeed optimizer state partitioned for ZeRO-"
                f"{sd.get('zero_stage')} over {len(shards)} worker(s); this run has ZeRO-"
                f"{self.cfg.zero_stage} over {world}. Resume with the same number of workers, "
                "or start a new run with another --out")
        shards = [self._revive(s) for s in shards]
        if self._partitioned:
            # fp32 master weights from the checkpoint (exact), not re-derived from the
            # (possibly bf16) model weights.
            self.optimizer.load_state_dict(shards, load_optimizer_states=True,
                                           load_from_fp32_weights=True)
        else:
            self.optimizer.load_state_dict(shards[0])
        if self.scheduler is not None and "scheduler" in sd:
            self.scheduler.load_state_dict(sd["scheduler"])
        for k, v in sd.get("counters", {}).items():
            setattr(self.model, k, v)

    def _revive(self, state: Any) -> Any:
        """Undo :func:`_plain`'s loss-scaler encoding: the optimizer's own scaler object
        (same class: same precision) with the saved numbers."""
        if isinstance(state, dict):
            if set(state) == {"__ds_loss_scaler__"}:
                scaler = self.optimizer.loss_scaler
                for k, v in state["__ds_loss_scaler__"].items():
                    setattr(scaler, k, v)
                return scaler
            return {k: self._revive(v) for k, v in state.items()}
        return state
