"""The per-worker training loop, shared by ``raykd train`` (Ray Train workers) and in-process runs.

Per step: this rank's share of the global labeled batch (and ``uratio`` × as many unlabeled images),
the method's loss, SGD with Nesterov momentum, a cosine learning-rate schedule, no weight decay on
1-D parameters (BN weights, biases), and an EMA update.  Every ``eval_every`` steps (and at the last
step) the EMA model (or the raw one with ``train.ema: 0``) is evaluated on the validation and test
sets, logs are averaged over the window and all-reduced across ranks, and rank 0 writes a checkpoint
that is reported together with the metrics; at the last step it also writes ``result.json``.  A
restart resumes from the latest checkpoint (model, EMA, optimiser, method state and step); batch
sampling and augmentation are functions of the step, so it continues exactly.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raykd.config import RunConfig
from raykd.data import ArrayDataset, SSLData, data_of
from raykd.data.augment import Augmenter
from raykd.methods import METHODS, Batch, Method
from raykd.models import build_model
from raykd.train.context import Session, StepContext, append_progress, write_result
from raykd.train.ema import ModelEMA
from raykd.train.sampler import GlobalBatchSampler
from raykd.train.teacher import load_teacher

CHECKPOINT_FILE = "state.pt"
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


@torch.no_grad()
def evaluate_all(
    method: Method, model: nn.Module, ds: ArrayDataset, ctx: StepContext, batch_size: int
) -> tuple[float, dict[str, float]]:
    """Accuracy of ``method.predict_all``'s logits and of each of its named extra logits on ``ds``,
    sharded over ranks and all-reduced."""
    was_training = model.training
    model.eval()
    idx = torch.arange(ctx.rank, len(ds), ctx.world_size)
    heads = list(method.eval_heads(ctx.run))
    counts = torch.zeros(2 + len(heads), dtype=torch.float64, device=ctx.device)  # [main, *heads, n]
    for chunk in idx.split(batch_size):
        x = ds.images[chunk].to(ctx.device, non_blocking=True)
        y = ds.labels[chunk].to(ctx.device, non_blocking=True)
        with ctx.autocast():
            logits, extra = method.predict_all(model, ctx.plain(x))
        for i, z in enumerate([logits, *(extra[h] for h in heads)]):
            counts[i] += (z.argmax(dim=-1) == y).sum()
        counts[-1] += len(chunk)
    ctx.all_reduce(counts)
    model.train(was_training)
    acc = (counts[:-1] / counts[-1].clamp_min(1)).tolist()
    return acc[0], dict(zip(heads, acc[1:], strict=True))


class _LogWindow:
    """Running Σnum / Σden per log key, kept on the device (no host sync per step)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.acc: dict[str, torch.Tensor] = {}

    def add(self, logs: dict[str, Any]) -> None:
        for k, v in logs.items():
            num, den = v if isinstance(v, tuple) else (v, 1.0)
            pair = torch.stack(
                [
                    torch.as_tensor(num, dtype=torch.float64, device=self.device).detach(),
                    torch.as_tensor(den, dtype=torch.float64, device=self.device).detach(),
                ]
            )
            self.acc[k] = self.acc[k] + pair if k in self.acc else pair

    def reduce(self, ctx: StepContext) -> dict[str, float]:
        keys = sorted(self.acc)
        if not keys:
            return {}
        stacked = ctx.all_reduce(torch.stack([self.acc[k] for k in keys]))
        self.acc = {}
        out = {}
        for k, (num, den) in zip(keys, stacked.tolist(), strict=True):
            out[k] = num / den if den > 0 else float("nan")
        return out


def _labeled_batch(data: SSLData, idx: torch.Tensor, device: torch.device):
    ds = data.labeled
    return (
        ds.images[idx].to(device, non_blocking=True),
        ds.labels[idx].to(device, non_blocking=True),
        idx.to(device),
    )


def train_loop(
    cfg: RunConfig,
    session: Session,
    run_dir: str | Path,
    stop_at: int | None = None,
    on_end: Callable[[StepContext, Method], None] | None = None,
    teacher_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Train one run on this worker; returns the last reported metrics.

    Args:
        cfg: the resolved run config.
        session: where the loop runs (Ray Train worker or in-process).
        run_dir: the run folder (absolute when on Ray); rank 0 appends ``progress.jsonl`` there.
        stop_at: stop after the report at this step (simulates an interruption; for tests).
        on_end: called on every rank with the context and method after the last step (tests use it
            to compare per-rank weights and state).
        teacher_dir: the teacher's run folder (from :func:`raykd.train.teacher.ensure_teacher`) when
            the method needs a teacher.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t, device = cfg.train, session.device
    rank, world = session.rank, session.world_size
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))

    data = data_of(cfg)
    torch.manual_seed(t.seed)  # identical initialisation on every rank
    c, h, _ = data.image_shape
    raw = build_model(
        cfg.model.name,
        num_classes=data.num_classes,
        in_channels=c,
        image_size=h,
        bn_momentum=cfg.model.resolved_bn_momentum(t.steps),
        **cfg.model.args(),
    )
    raw = METHODS.get(cfg.method.name).wrap_model(raw, cfg, data.image_shape)  # e.g. TSKD's exits
    channels_last = t.channels_last and device.type == "cuda"
    if channels_last:
        raw = raw.to(memory_format=torch.channels_last)
    model = session.prepare_model(raw)
    raw = unwrap(model)

    augmenter = Augmenter(hflip=data.hflip, ra_num_ops=t.ra_num_ops, mean=data.mean, std=data.std)
    generator = torch.Generator(device=device)
    teacher = None
    if cfg.teacher is not None:
        if teacher_dir is None:
            raise ValueError("this run has a teacher: pass teacher_dir (raykd.train.teacher.ensure_teacher)")
        teacher = load_teacher(teacher_dir, device)
    ctx = StepContext(
        run=cfg,
        data=data,
        device=device,
        rank=rank,
        world_size=world,
        model=model,
        raw_model=raw,
        augmenter=augmenter,
        generator=generator,
        channels_last=channels_last,
        teacher=teacher,
        teacher_dir=Path(teacher_dir) if teacher is not None else None,
    )
    method: Method = METHODS.get(cfg.method.name)(ctx)
    method.setup()
    ema = ModelEMA(raw, t.ema) if t.ema > 0 else None  # after setup: a method may initialise the student
    extras = {name: session.prepare_model(m) for name, m in method.extra_modules().items()}
    ctx.extras.update(extras)  # methods call their extra modules through these (DDP-wrapped when distributed)
    optimizer = torch.optim.SGD(
        param_groups([raw, *map(unwrap, extras.values())], t.weight_decay),
        lr=t.lr,
        momentum=t.momentum,
        nesterov=t.nesterov and t.momentum > 0,
    )

    start, best = 0, {"best_val_acc": -1.0, "test_acc_at_best_val": float("nan"), "best_test_acc": -1.0}
    ckpt = session.latest_checkpoint()
    if ckpt is not None:
        state = torch.load(Path(ckpt) / CHECKPOINT_FILE, map_location=device, weights_only=True)
        raw.load_state_dict(state["model"])
        for name, m in extras.items():
            unwrap(m).load_state_dict(state["extras"][name])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        method.load_state_dict(state["method"])
        start, best = int(state["step"]), dict(state["best"])
    method.before_training()

    lab_sampler = GlobalBatchSampler(len(data.labeled), t.batch_size, rank, world, seed=2 * t.seed)
    unl_sampler = None
    if method.uses_unlabeled and t.uratio > 0:
        unl_sampler = GlobalBatchSampler(len(data.unlabeled), t.batch_size * t.uratio, rank, world, seed=2 * t.seed + 1)
    eval_model = ema.module if ema is not None else raw
    views = 1 + (2 * t.uratio if unl_sampler is not None else 0)

    window = _LogWindow(device)
    metrics: dict[str, Any] = {}
    t_window, steps_window = time.perf_counter(), 0
    model.train()
    for step in range(start, t.steps):
        x, y, idx = _labeled_batch(data, lab_sampler.indices(step), device)
        u = u_idx = u_y = None
        if unl_sampler is not None:
            u_idx_cpu = unl_sampler.indices(step)
            u = data.unlabeled.images[u_idx_cpu].to(device, non_blocking=True)
            u_y = data.unlabeled.labels[u_idx_cpu].to(device, non_blocking=True)
            u_idx = u_idx_cpu.to(device)
        # augmentation randomness is a function of (seed, rank, step): a resumed run repeats it exactly
        generator.manual_seed(((t.seed * 1_000_003 + rank) * 1_000_003 + step) % (2**63))
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, step)
        loss, logs = method.train_step(Batch(x=x, y=y, idx=idx, u=u, u_idx=u_idx, u_y=u_y, step=step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ema is not None:
            ema.update(raw)
        window.add({"loss": loss.detach(), **logs})
        steps_window += 1

        done = step + 1
        if done % t.eval_every and done != t.steps and done != stop_at:
            continue
        logs_avg = window.reduce(ctx)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t_window
        sizes = ctx.all_reduce(torch.tensor([x.shape[0], 0 if u is None else u.shape[0]], device=device))
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
        for module in (raw, eval_model):
            ctx.broadcast_buffers(module)
        method.before_evaluation(eval_model)
        metrics["test_acc"], heads = evaluate_all(method, eval_model, data.test, ctx, t.eval_batch_size)
        metrics.update({f"test_{h}_acc": v for h, v in heads.items()})
        best["best_test_acc"] = max(best["best_test_acc"], metrics["test_acc"])
        metrics["best_test_acc"] = best["best_test_acc"]
        if data.val is not None:
            metrics["val_acc"], heads = evaluate_all(method, eval_model, data.val, ctx, t.eval_batch_size)
            metrics.update({f"val_{h}_acc": v for h, v in heads.items()})
            if metrics["val_acc"] > best["best_val_acc"]:
                best["best_val_acc"], best["test_acc_at_best_val"] = metrics["val_acc"], metrics["test_acc"]
            metrics["best_val_acc"] = best["best_val_acc"]
            metrics["test_acc_at_best_val"] = best["test_acc_at_best_val"]
        metrics["evaluated"] = "ema" if ema is not None else "raw"
        with tempfile.TemporaryDirectory() as tmp:
            ckpt_dir = None
            if rank == 0:
                state = {
                    "model": raw.state_dict(),
                    "ema": ema.state_dict() if ema is not None else {},
                    "extras": {k: unwrap(m).state_dict() for k, m in extras.items()},
                    "optimizer": optimizer.state_dict(),
                    "method": method.state_dict(),
                    "step": done,
                    "best": best,
                }
                torch.save(state, Path(tmp) / CHECKPOINT_FILE)
                ckpt_dir = Path(tmp)
                append_progress(run_dir, metrics)
                if done == t.steps:  # before the report: a scheduler may end the run at its last report
                    write_result(run_dir, metrics)
            session.report(metrics, ckpt_dir)
        t_window, steps_window = time.perf_counter(), 0
        if done == stop_at:
            break
    if on_end is not None:
        on_end(ctx, method)
    return metrics
