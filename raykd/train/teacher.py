"""Teachers: trained once (cached by the hash of their resolved run config), loaded frozen.

``ensure_teacher`` runs on the driver before the student (``raykd train``) or before any trial
starts (``raykd study run`` / ``raykd ablate``), so trials never train a teacher, let alone twice;
a file lock makes concurrent drivers sharing a cache folder safe too.  ``load_teacher`` runs on every
worker: it rebuilds the teacher's architecture from its run folder's ``config.yaml``, loads the
evaluated weights (the EMA copy when the teacher kept one) with ``torch.load(weights_only=True)``, and
freezes it: eval mode, ``requires_grad=False``, never handed to the optimiser.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from raykd.config import RunConfig, class_mismatch
from raykd.errors import ConfigError
from raykd.registry import METHODS
from raykd.train.runfolder import CONFIG_FILE, STATE_FILE, RunFolder

TEACHERS_DIR = "teachers"


def teacher_hash(cfg: RunConfig) -> str:
    """A short stable hash of a resolved run config."""
    # what may change between runs without changing the teacher (retries, checkpoints kept) is left out
    volatile = {"provenance": True, "train": {"max_failures", "keep_checkpoints", "eval_batch_size", "tensorboard"}}
    text = json.dumps(cfg.model_dump(mode="json", exclude=volatile), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _find_run_folder(path: Path) -> Path:
    for d in [path, *path.parents]:
        if (d / CONFIG_FILE).is_file():
            return d
    raise ConfigError("teacher.checkpoint", f"{path} is not inside a raykd run folder (no config.yaml found); "
                      "point it at the folder `raykd train` wrote")  # fmt: skip


def teacher_config(path: str | Path) -> RunConfig:
    """The run config of the raykd run folder that holds ``path`` (a run folder or a file in one)."""
    return RunFolder(_find_run_folder(Path(path).resolve())).config(field="teacher.checkpoint")


def _checkpoint_folder(cfg: RunConfig) -> Path:
    """A ``teacher.checkpoint`` that exists, lies in a raykd run folder and shares the student's
    classes, resolved; ConfigError on ``teacher.checkpoint`` otherwise."""
    path = Path(cfg.teacher.checkpoint)
    if not path.exists():
        raise ConfigError("teacher.checkpoint", f"{path} does not exist; give a raykd run folder")
    mismatch = class_mismatch(cfg.data, teacher_config(path).data)
    if mismatch:
        raise ConfigError("teacher.checkpoint", f"data.{mismatch[0]}: {mismatch[1]}")
    return path.resolve()


def check_checkpoint_teacher(cfg: RunConfig) -> None:
    """Every driver-side check of a ``teacher.checkpoint``, before anything starts or is written: the
    path exists, it is inside a raykd run folder whose config parses, the classes match, and its
    state file loads weights-only and fits the architecture its config describes."""
    if cfg.teacher is None or cfg.teacher.checkpoint is None:
        return
    path = _checkpoint_folder(cfg)
    try:
        load_teacher(path, torch.device("cpu"))
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: name it and say what to do
        state = _latest_state(path)
        raise ConfigError("teacher.checkpoint", f"cannot load {state} ({type(e).__name__}: "
                          f"{(str(e).splitlines() or [''])[0][:160]}); point at an intact raykd run folder or "
                          "retrain the teacher") from None  # fmt: skip


def ensure_teacher(cfg: RunConfig, cache_root: Path, train: Callable[[RunConfig, Path], object]) -> Path | None:
    """The teacher's run folder, training it first with ``train(teacher_cfg, folder)`` if needed.

    Returns None when ``cfg`` has no teacher.  ``teacher.checkpoint`` is checked, never trained.
    """
    if cfg.teacher is None:
        return None
    if cfg.teacher.checkpoint is not None:
        return _checkpoint_folder(cfg)
    folder = (cache_root / TEACHERS_DIR / f"teacher-{teacher_hash(cfg.teacher.run)}").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second driver waits here, then finds the result
        run = RunFolder(folder)
        if not run.finished:
            run.write_config(cfg.teacher.run)
            train(cfg.teacher.run, folder)
        if not run.finished:
            raise RuntimeError(f"training the teacher in {folder} did not finish")
    return folder


def prepare_teacher(cfg: RunConfig, cache_root: Path, address: str | None = None) -> Path | None:
    """``ensure_teacher`` on a driver: a missing teacher is trained with ``raykd train``'s machinery
    (Ray Train, the teacher's own ``scaling``), with progress lines, into ``cache_root/teachers/``."""
    from raykd.train.trainer import run_training

    def train(tcfg: RunConfig, folder: Path) -> None:
        t = tcfg.train
        print(f"teacher: training it first: {tcfg.method.name} on {tcfg.data.name} "
              f"({tcfg.data.labels_per_class or 'all'} labels/class), {tcfg.model.name}, {t.steps} steps -> {folder}",
              flush=True)  # fmt: skip
        run_training(tcfg, folder, address=address, prefix="teacher: ")

    folder = ensure_teacher(cfg, cache_root, train)
    if folder is not None:
        print(f"teacher: {folder} (frozen)", flush=True)
    return folder


def _latest_state(path: Path) -> Path:
    """The teacher's state file: ``path`` itself, ``path/state.pt``, or the final checkpoint of the run
    folder ``path``."""
    if path.is_file():
        return path
    if (path / STATE_FILE).is_file():
        return path / STATE_FILE
    found = RunFolder(path).final_state()
    if found is None:
        raise ConfigError("teacher.checkpoint", f"no {STATE_FILE} under {path}; train the teacher first")
    return found


def load_teacher(path: str | Path, device: torch.device) -> nn.Module:
    """Build the teacher from its run folder and load its evaluated weights, frozen, on ``device``."""
    from raykd.data import data_of
    from raykd.models import build_model

    path = Path(path)
    tcfg = teacher_config(path)
    data = data_of(tcfg)
    c, h, _ = data.image_shape
    model = build_model(tcfg.model.name, num_classes=data.num_classes, in_channels=c, image_size=h,
                        bn_momentum=tcfg.model.resolved_bn_momentum(tcfg.train.steps), **tcfg.model.args())  # fmt: skip
    model = METHODS.get(tcfg.method.name).configure_model(model, tcfg, data.image_shape)  # as its run trained it
    state = torch.load(_latest_state(path), map_location="cpu", weights_only=True)
    weights = state["ema"]["module"] if state.get("ema") else state["model"]
    model.load_state_dict(weights)
    return freeze(model.to(device))


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients (the loop never puts the teacher back in train mode)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def teacher_table(
    teacher_dir: str | Path, rank: int, world_size: int, prefix: str, key: object, build: Callable[[], dict]
) -> dict:
    """A per-sample table derived from the frozen teacher (trusted labels, α/k, ...), identical on every rank.

    Rank 0 calls ``build()`` once per ``key`` (any JSON-able description of everything the table
    depends on) under a file lock — concurrent trials with the same setting build it once — and saves
    it beside the teacher as ``<prefix>-<hash of key>.pt``; after a barrier every rank loads that file.
    Methods reach it as ``ctx.teacher_table(prefix, key, build)``.
    """
    folder = Path(teacher_dir)
    folder = folder if folder.is_dir() else folder.parent  # teacher.checkpoint may name a state.pt
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    path = folder / f"{prefix}-{digest}.pt"
    if rank == 0:
        with open(path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not path.exists():
                tmp = path.with_suffix(".tmp")
                torch.save(build(), tmp)
                tmp.replace(path)
    if world_size > 1 and dist.is_initialized():
        dist.barrier()  # every rank reads rank 0's table
    return torch.load(path, map_location="cpu", weights_only=True)
