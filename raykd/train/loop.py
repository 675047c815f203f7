"""The per-worker training loop, shared by ``raykd train`` (Ray Train workers), study trials and
in-process runs.

Per step: this rank's share of the global labeled batch (and ``uratio`` × as many unlabeled images),
the method's loss, SGD with Nesterov momentum, a cosine learning-rate schedule, no weight decay on
1-D parameters (BN weights, biases), and an EMA update.  Every ``eval_every`` steps (and at the last
step) the EMA model (or the raw one with ``train.ema: 0``) is evaluated on the validation and test
sets, logs are averaged over the window and all-reduced across ranks, and rank 0 writes a checkpoint
that is reported together with the metrics, and the metrics into ``progress.jsonl`` and TensorBoard
event files keyed by the step (``tb/``, :mod:`raykd.train.events`); at the last step it also writes
``result.json``.  A restart resumes from the latest checkpoint (model, EMA, optimiser, method state
and step); batch sampling and augmentation are functions of the step, so it continues exactly.

:func:`train_loop` runs these named phases: :func:`build_run` (student, method, EMA, optimiser),
:func:`restore` (the latest checkpoint), then per step :func:`train_one_step`, and at each evaluation
:func:`evaluate_run` and :func:`checkpoint_state`.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raykd.config import RunConfig
from raykd.data import SSLData, data_of
from raykd.data.augment import Augmenter
from raykd.errors import ConfigError
from raykd.methods.base import Batch, Method
from raykd.models import build_model
from raykd.registry import METHODS
from raykd.train.context import Session, StepContext
from raykd.train.cost import model_cost
from raykd.train.ema import ModelEMA
from raykd.train.events import StepEvents
from raykd.train.runfolder import STATE_FILE, RunFolder, warn
from raykd.train.sampler import GlobalBatchSampler
from raykd.train.teacher import load_teacher, teacher_config

#: metrics every run reports at each evaluation (besides its method's ``logs``)
LOOP_METRICS = ("step", "epoch", "lr", "loss", "img_per_s", "test_acc", "best_test_acc")
#: metrics reported only with a validation split (``data.val_per_class > 0``)
VAL_METRICS = ("val_acc", "best_val_acc", "test_acc_at_best_val")


def lr_at(cfg: RunConfig, step: int) -> float:
    """Learning rate for 0-based ``step``: FixMatch's cosine ``lr·cos(7πk / 16K)`` or constant."""
    t = cfg.train
    if t.lr_schedule == "constant":
        return t.lr
    return t.lr * math.cos(7.0 * math.pi * step / (16.0 * t.steps))


def param_groups(modules: list[nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    """Two SGD groups: weight decay on ≥2-D weights only, none on BN weights and biases."""
    decay, no_decay = [], []
    for module in modules:
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def compile_unavailable(device: torch.device) -> str | None:
    """Why ``torch.compile`` (TorchDynamo + inductor) cannot build a training step on ``device`` in
    this process, or None when it can: TorchDynamo unsupported (Python version, platform), no C++
    compiler for inductor's CPU code, or no Triton for its GPU kernels."""
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    try:
        from torch import _dynamo

        if not _dynamo.is_dynamo_supported():
            return "TorchDynamo does not support this Python or platform"
    except Exception as e:  # noqa: BLE001 - any failure to import or query it means no compile
        return f"TorchDynamo does not run here ({type(e).__name__}: {e})"
    if device.type == "cuda":
        try:
            from torch.utils._triton import has_triton

            if not has_triton():
                return "Triton (inductor's GPU compiler) is not installed or does not support this GPU"
        except ImportError:
            return "torch has no Triton support"
    elif device.type == "cpu":
        try:
            from torch._inductor import cpp_builder

            compiler = cpp_builder.get_cpp_compiler()
        except Exception as e:  # noqa: BLE001 - inductor raises its own error types for a missing compiler
            return f"inductor finds no C++ compiler for CPU code ({type(e).__name__}: {e})"
        if not shutil.which(str(compiler).split()[0]):
            return f"inductor's C++ compiler {compiler!r} is not on PATH"
    return None


def compile_error(device: torch.device, reason: str) -> ConfigError:
    """The error of a run with ``train.compile: true`` where compile cannot run (exit code 2)."""
    return ConfigError("train.compile", f"torch.compile is unavailable on {device.type}: {reason}; "
                       "set train.compile: false (eager mode trains the same model)")  # fmt: skip


class _LogWindow:
    """Running Σnum / Σden per log key over an evaluation window, with no host sync per step.

    Tensor parts (device scalars) are summed on the device, in float64; Python numbers (a constant
    denominator of 1, a method's fixed figures) are summed on the host, so that no per-step value
    is copied to the device (on CUDA a blocking host-to-device copy waits for the device's queue).
    Both are read back once, in :meth:`reduce` at the evaluation.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.num: dict[str, torch.Tensor | float] = {}
        self.den: dict[str, torch.Tensor | float] = {}

    @staticmethod
    def _part(v: Any) -> torch.Tensor | float:
        return v.detach().to(dtype=torch.float64) if isinstance(v, torch.Tensor) else float(v)

    def add(self, logs: dict[str, Any]) -> None:
        for k, v in logs.items():
            num, den = v if isinstance(v, tuple) else (v, 1.0)
            num, den = self._part(num), self._part(den)
            if k in self.num:
                num, den = self.num[k] + num, self.den[k] + den
            self.num[k], self.den[k] = num, den

    def _on_device(self, v: torch.Tensor | float) -> torch.Tensor:
        return v if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=torch.float64, device=self.device)

    def reduce(self, ctx: StepContext) -> dict[str, float]:
        keys = sorted(self.num)
        if not keys:
            return {}
        pairs = [torch.stack([self._on_device(self.num[k]), self._on_device(self.den[k])]) for k in keys]
        stacked = ctx.all_reduce(torch.stack(pairs))
        self.num, self.den = {}, {}
        out = {}
        for k, (num, den) in zip(keys, stacked.tolist(), strict=True):
            out[k] = num / den if den > 0 else float("nan")
        return out


@dataclass
class Run:
    """Everything one worker's loop holds for a run (built by :func:`build_run`)."""

    cfg: RunConfig
    ctx: StepContext
    method: Method
    model: nn.Module  # as called in training (DDP-wrapped when distributed)
    raw: nn.Module
    ema: ModelEMA | None
    optimizer: torch.optim.Optimizer
    start: int
    best: dict[str, float]
    cost: dict[str, Any] | None = None  # the evaluated model's cost (raykd.train.cost), measured once

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.raw

    @property
    def extras(self) -> dict[str, nn.Module]:
        return self.ctx.modules


def build_student(cfg: RunConfig, data: SSLData) -> nn.Module:
    """The registered model for ``cfg`` around ``data``'s shape, as the method configures it."""
    c, h, _ = data.image_shape
    raw = build_model(
        cfg.model.name,
        num_classes=data.num_classes,
        in_channels=c,
        image_size=h,
        bn_momentum=cfg.model.resolved_bn_momentum(cfg.train.steps),
        **cfg.model.args(),
    )
    return METHODS.get(cfg.method.name).configure_model(raw, cfg, data.image_shape)  # e.g. TSKD's exits


def build_run(cfg: RunConfig, session: Session, teacher_dir: str | Path | None) -> Run:
    """Phase 1: data, student (configured by the method, prepared for DDP), teacher, context,
    method (``setup``), EMA copy and optimiser."""
    t, device = cfg.train, session.device
    data = data_of(cfg)
    torch.manual_seed(t.seed)  # identical initialisation on every rank
    raw = build_student(cfg, data)
    channels_last = t.channels_last and device.type == "cuda"
    if channels_last:
        raw = raw.to(memory_format=torch.channels_last)
    model = session.prepare_model(raw)
    raw = unwrap(model)
    if t.compile:  # the training forward only; raw (checkpoints, EMA, evaluation) stays the plain module
        reason = compile_unavailable(device)
        if reason is not None:
            raise compile_error(device, reason)
        model = torch.compile(model)

    teacher = teacher_run = None
    if cfg.teacher is not None:
        if teacher_dir is None:
            raise ValueError("this run has a teacher: pass teacher_dir (raykd.train.teacher.ensure_teacher)")
        teacher, teacher_run = load_teacher(teacher_dir, device), teacher_config(teacher_dir)
    ctx = StepContext(
        run=cfg,
        data=data,
        device=device,
        rank=session.rank,
        world_size=session.world_size,
        model=model,
        raw_model=raw,
        augmenter=Augmenter(hflip=data.hflip, ra_num_ops=t.ra_num_ops, mean=data.mean, std=data.std),
        generator=torch.Generator(device=device),
        channels_last=channels_last,
        teacher=teacher,
        teacher_run=teacher_run,
        teacher_dir=Path(teacher_dir) if teacher is not None else None,
        prepare=session.prepare_model,
    )
    method: Method = METHODS.get(cfg.method.name)(ctx)
    ctx.method = method
    method.setup()  # may register extra trainable modules
    ema = ModelEMA(raw, t.ema) if t.ema > 0 else None  # after setup: a method may initialise the student
    optimizer = torch.optim.SGD(
        param_groups([raw, *map(unwrap, ctx.modules.values())], t.weight_decay),
        lr=t.lr,
        momentum=t.momentum,
        nesterov=t.nesterov and t.momentum > 0,
    )
    best = {"best_val_acc": -1.0, "test_acc_at_best_val": float("nan"), "best_test_acc": -1.0}
    return Run(cfg, ctx, method, model, raw, ema, optimizer, 0, best)


def _candidates(ckpt: Path, folder: RunFolder) -> list[Path]:
    """The state files to try, newest first: ``ckpt`` (the checkpoint Ray hands back) and the
    checkpoints beside it in the run's storage, then the other ones in the run folder.

    A checkpoint beside Ray's that is newer than it is one the workers wrote and reported, but the
    driver stopped (Ctrl-C, a crash, a lost node) before Ray's controller recorded it: its state is
    as complete as Ray's (an unreadable one is skipped), so the run redoes at most the steps since
    the last checkpoint written, not since the last one Ray had recorded.  A copy Ray downloaded
    (``checkpoint_tmp_*``, from cloud storage) has no siblings of its own."""
    seen, out = set(), []

    def mtime(p: Path) -> float:
        return (p / STATE_FILE).stat().st_mtime if (p / STATE_FILE).is_file() else p.stat().st_mtime

    if ckpt.name.startswith("checkpoint_tmp_"):
        siblings = [ckpt]
    else:
        siblings = sorted({ckpt, *ckpt.parent.glob("checkpoint*")} - set(ckpt.parent.glob("checkpoint_tmp_*")),
                          key=mtime, reverse=True)  # fmt: skip
        siblings += sorted(ckpt.parent.glob("step_*"), reverse=True)
    for path in [*(s / STATE_FILE for s in siblings), *folder.state_files()]:
        key = path.resolve() if path.exists() else path
        if key not in seen and path.is_file():
            seen.add(key)
            out.append(path)
    return out


def _load_state(run: Run, ckpt: Path, folder: RunFolder) -> dict[str, Any]:
    """The state of the latest intact checkpoint: a truncated or unreadable one is skipped with a
    warning naming it, and the newest older one is used (the run redoes the steps in between)."""
    for path in _candidates(ckpt, folder):
        try:
            state = torch.load(path, map_location=run.ctx.device, weights_only=True)
            if isinstance(state, dict) and "step" in state:
                return state
            raise ValueError("not a raykd checkpoint")
        except Exception as e:  # noqa: BLE001 - any unreadable file: say which, try the next one
            if run.ctx.rank == 0:
                warn(f"checkpoint {path} is unreadable ({type(e).__name__}); trying an older one")
    raise RuntimeError(f"no intact checkpoint to resume from (tried {ckpt} and the run folder {folder.path}); "
                       "move the folder away to start the run again")


def restore(run: Run, ckpt: Path | None, folder: RunFolder) -> None:
    """Phase 2: load the latest intact checkpoint (model, extras, EMA, optimiser, method state, step):
    the newest of ``ckpt`` and those beside it (:func:`_candidates`), or, when Ray hands none, the
    newest in the run folder; ``folder``'s other checkpoints are the fallbacks."""
    if ckpt is None:
        # Ray recorded no checkpoint, but the run's storage may hold one the workers wrote before the
        # driver stopped (a Ctrl-C or a crash right after the first evaluation): start from it
        found = folder.state_files()
        if not found:
            return
        try:
            state = _load_state(run, found[0].parent, folder)
        except RuntimeError:  # only unreadable ones (a copy cut short): nothing was recorded, start afresh
            return
    else:
        state = _load_state(run, Path(ckpt), folder)
    run.raw.load_state_dict(state["model"])
    for name, m in run.extras.items():
        unwrap(m).load_state_dict(state["extras"][name])
    if run.ema is not None:
        run.ema.load_state_dict(state["ema"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.method.load_state_dict(state["method"])
    run.start, run.best = int(state["step"]), dict(state["best"])


def _batch(run: Run, step: int, lab: GlobalBatchSampler, unl: GlobalBatchSampler | None) -> Batch:
    data, device = run.ctx.data, run.ctx.device
    idx = lab.indices(step)
    x = data.labeled.images[idx].to(device, non_blocking=True)
    y = data.labeled.labels[idx].to(device, non_blocking=True)
    u = u_idx = u_y = None
    if unl is not None:
        u_idx_cpu = unl.indices(step)
        u = data.unlabeled.images[u_idx_cpu].to(device, non_blocking=True)
        u_y = data.unlabeled.labels[u_idx_cpu].to(device, non_blocking=True)
        u_idx = u_idx_cpu.to(device, non_blocking=True)
    return Batch(x=x, y=y, idx=idx.to(device, non_blocking=True), u=u, u_idx=u_idx, u_y=u_y, step=step)


def train_one_step(run: Run, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
    """Phase 3, every step: seed the augmentations, set the learning rate, loss, backward, SGD, EMA."""
    cfg, step = run.cfg, batch.step
    # augmentation randomness is a function of (seed, rank, step): a resumed run repeats it exactly
    run.ctx.generator.manual_seed(((cfg.train.seed * 1_000_003 + run.ctx.rank) * 1_000_003 + step) % (2**63))
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(cfg, step)
    loss, logs = run.method.train_step(batch)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    if run.ema is not None:
        run.ema.update(run.raw)
    return loss, logs


def _first_compiled_step(run: Run, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
    """The first step of a compiled run, where torch.compile builds the graph: a failure of the
    compiler itself (not of the method) becomes a ``train.compile`` error."""
    from torch._dynamo.exc import BackendCompilerFailed

    try:
        return train_one_step(run, batch)
    except BackendCompilerFailed as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise compile_error(run.ctx.device, f"the compiler failed ({first[:300]})") from e


def evaluate_run(run: Run, metrics: dict[str, Any]) -> None:
    """Phase 4, at each evaluation: BN buffers from rank 0, the method's hook, test (and validation)
    accuracy of the evaluated model and of every named head, the best-so-far bookkeeping."""
    ctx, best, data, eval_model = run.ctx, run.best, run.ctx.data, run.eval_model
    for module in (run.raw, eval_model):
        ctx.broadcast_buffers(module)
    run.method.on_evaluation_start(eval_model)
    metrics["test_acc"], heads = ctx.evaluate(eval_model, data.test)
    metrics.update({f"test_{h}_acc": v for h, v in heads.items()})
    best["best_test_acc"] = max(best["best_test_acc"], metrics["test_acc"])
    metrics["best_test_acc"] = best["best_test_acc"]
    if data.val is not None:
        metrics["val_acc"], heads = ctx.evaluate(eval_model, data.val)
        metrics.update({f"val_{h}_acc": v for h, v in heads.items()})
        if metrics["val_acc"] > best["best_val_acc"]:
            best["best_val_acc"], best["test_acc_at_best_val"] = metrics["val_acc"], metrics["test_acc"]
        metrics["best_val_acc"] = best["best_val_acc"]
        metrics["test_acc_at_best_val"] = best["test_acc_at_best_val"]
    metrics["evaluated"] = "ema" if run.ema is not None else "raw"


def measure_cost(run: Run) -> dict[str, Any]:
    """Phase 4b, at this process's first evaluation: ``params``, ``macs`` and ``latency_ms`` of the
    evaluated model through the method's ``predict`` on one test image (:mod:`raykd.train.cost`);
    reported with every evaluation after it.  Reads the weights only: training is unchanged."""
    if run.cost is None:
        ctx = run.ctx
        x = ctx.plain(ctx.data.test.images[:1].to(ctx.device))
        run.cost = model_cost(run.eval_model, run.method.predict, x, ctx.autocast)
    return run.cost


def checkpoint_state(run: Run, step: int) -> dict[str, Any]:
    """Phase 5, at each evaluation (rank 0): everything :func:`restore` needs."""
    return {
        "model": run.raw.state_dict(),
        "ema": run.ema.state_dict() if run.ema is not None else {},
        "extras": {k: unwrap(m).state_dict() for k, m in run.extras.items()},
        "optimizer": run.optimizer.state_dict(),
        "method": run.method.state_dict(),
        "step": step,
        "best": run.best,
    }


def divergence(metrics: dict[str, Any], limit: float | None, watched: tuple[str, ...] = ()) -> str | None:
    """Why an evaluation's metrics mean the run diverged, or None: the loss is not finite or above
    ``limit`` (``train.divergence_loss``), or a ``watched`` metric (a study's ``tune.metric``) is not
    finite."""
    loss = metrics.get("loss")
    if isinstance(loss, float) and not math.isfinite(loss):
        return f"loss is {loss}"
    if isinstance(loss, float) and limit is not None and loss > limit:
        return f"loss {loss:.3g} is above train.divergence_loss {limit:g}"
    for key in watched:
        value = metrics.get(key)
        if isinstance(value, float) and not math.isfinite(value):
            return f"{key} is {value}"
    return None


def train_loop(
    cfg: RunConfig,
    session: Session,
    run_dir: str | Path,
    stop_at: int | None = None,
    on_end: Callable[[StepContext, Method], None] | None = None,
    teacher_dir: str | Path | None = None,
    watched: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Train one run on this worker; returns the last reported metrics.

    The returned metrics are the last evaluation's; the record written to ``progress.jsonl`` and
    ``result.json`` and reported to Ray adds the evaluated model's cost (:data:`raykd.train.cost.COST_METRICS`).

    Args:
        cfg: the resolved run config.
        session: where the loop runs (Ray Train worker, inline Tune trial or in-process).
        run_dir: the run folder (absolute when on Ray); rank 0 appends ``progress.jsonl`` there.
        stop_at: stop after the report at this step (simulates an interruption; for tests).
        on_end: called on every rank with the context and method after the last step (tests use it
            to compare per-rank weights and state).
        teacher_dir: the teacher's run folder (from :func:`raykd.train.teacher.ensure_teacher`) when
            the method needs a teacher.
        watched: metrics that must stay finite (a study's ``tune.metric``) besides the loss.

    A run whose loss is not finite or above ``train.divergence_loss`` (or a watched metric not
    finite) at an evaluation stops there as diverged: rank 0 writes ``failed.json`` (reason, step),
    nothing is reported for that evaluation, and the returned metrics carry ``diverged``.
    """
    folder = RunFolder(run_dir)
    folder.path.mkdir(parents=True, exist_ok=True)
    t, device = cfg.train, session.device
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))

    run = build_run(cfg, session, teacher_dir)
    restore(run, session.latest_checkpoint(), folder)
    if session.rank == 0:
        folder.truncate_progress(run.start)  # evaluations after the checkpoint are written again: keep them once
    run.method.on_train_start()
    events = StepEvents(folder.path, run.start) if session.rank == 0 and t.tensorboard else None

    ctx, rank, world = run.ctx, session.rank, session.world_size
    lab = GlobalBatchSampler(len(ctx.data.labeled), t.batch_size, rank, world, seed=2 * t.seed)
    unl = None
    if cfg.method.uses_unlabeled and t.uratio > 0:
        unl = GlobalBatchSampler(len(ctx.data.unlabeled), t.batch_size * t.uratio, rank, world, seed=2 * t.seed + 1)
    views = 1 + (2 * t.uratio if unl is not None else 0)

    window = _LogWindow(device)
    metrics: dict[str, Any] = {}
    t_window, steps_window = time.perf_counter(), 0
    run.model.train()
    for step in range(run.start, t.steps):
        batch = _batch(run, step, lab, unl)
        if step == run.start and t.compile:
            loss, logs = _first_compiled_step(run, batch)
        else:
            loss, logs = train_one_step(run, batch)
        window.add({"loss": loss.detach(), **logs})
        steps_window += 1

        done = step + 1
        if done % t.eval_every and done != t.steps and done != stop_at:
            continue
        logs_avg = window.reduce(ctx)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t_window
        sizes = ctx.all_reduce(torch.tensor([batch.x.shape[0], 0 if batch.u is None else batch.u.shape[0]],
                                            device=device))  # fmt: skip
        metrics = {
            "step": done,
            "epoch": math.ceil(done / t.eval_every),
            "lr": lr_at(cfg, step),
            **logs_avg,
            "img_per_s": steps_window * t.batch_size * views / max(elapsed, 1e-9),
            "global_batch": int(sizes[0]),
            "global_ubatch": int(sizes[1]),
            "world_size": world,
        }
        evaluate_run(run, metrics)
        record = {**metrics, **measure_cost(run)}  # what is written and reported
        reason = divergence(metrics, t.divergence_loss, watched)  # all-reduced values: every rank agrees
        if reason is not None:
            metrics["diverged"] = record["diverged"] = reason
            if rank == 0:
                folder.append_progress(record)  # the evaluation that diverged, for the record (not reported)
                if events is not None:
                    events.write(metrics)
                folder.write_failure({"reason": reason, "step": done, "metrics": record})
            break
        with tempfile.TemporaryDirectory() as tmp:
            ckpt_dir = None
            if rank == 0:
                torch.save(checkpoint_state(run, done), Path(tmp) / STATE_FILE)
                ckpt_dir = Path(tmp)
                folder.append_progress(record)
                if events is not None:
                    events.write(metrics)
                if done == t.steps:  # before the report: a scheduler may end the run at its last report
                    folder.write_result(record)
            session.report(record, ckpt_dir)
        t_window, steps_window = time.perf_counter(), 0
        if done == stop_at:
            break
    if events is not None:
        events.close()
    if on_end is not None:
        on_end(ctx, run.method)
    return metrics
