"""``raykd train``: one run through Ray Train (``TorchTrainer``, DDP with gloo on CPU / nccl on GPU).

The run folder holds ``config.yaml`` (the resolved config), ``progress.jsonl`` (one line per
evaluation, written by rank 0), ``train/checkpoint_*`` (Ray Train's checkpoints, the latest
``keep_checkpoints``) and, once finished, ``result.json``.  Running again into an unfinished folder
with the same config resumes from its latest checkpoint (Ray Train finds the run snapshot under
``(storage_path, name)``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from torch import nn

from raykd.config import RunConfig, parse_run_config
from raykd.errors import DivergedError
from raykd.train.loop import train_loop
from raykd.train.runfolder import PROGRESS_FILE, TRAIN_RUN_NAME, RunFolder


def worker_bundle(cfg: RunConfig) -> dict[str, float]:
    """What one worker reserves: ``cpus_per_worker`` CPUs, ``gpus_per_worker`` GPUs (when ``use_gpu``)
    and the extra ``resources_per_worker``."""
    s = cfg.scaling
    bundle = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        bundle["GPU"] = s.gpus_per_worker
    bundle.update(s.resources_per_worker)
    return bundle


def with_node_id(metrics: dict[str, Any], run_dir: Path | None = None) -> dict[str, Any]:
    """``metrics`` plus ``node_id``, the Ray node this process runs on; also adds it to
    ``run_dir/result.json`` when the loop has just written that (the last step, before reporting)."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    if run_dir is not None:
        folder = RunFolder(run_dir)
        record = folder.result()
        if record is not None and record.get("node_id") != node_id:
            folder.write_result({**record, "node_id": node_id})
    return {**metrics, "node_id": node_id}


class RayTrainSession:
    """The loop's :class:`~raykd.train.context.Session` inside a Ray Train worker."""

    def __init__(self, run_dir: str | Path | None = None) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.run_dir = Path(run_dir) if run_dir is not None and self.rank == 0 else None  # rank 0 writes result.json

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(with_node_id(metrics, self.run_dir), checkpoint=ckpt)

    def latest_checkpoint(self) -> Path | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        local = Path(ckpt.path)  # on local or shared storage: the folder itself (its siblings are the fallbacks)
        return local if local.is_dir() else Path(ckpt.to_directory())

    def prepare_model(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)


def _worker_fn(config: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker."""
    cfg = parse_run_config(config["config"])
    train_loop(cfg, RayTrainSession(config["run_dir"]), config["run_dir"], stop_at=config.get("stop_at"),
               teacher_dir=config.get("teacher_dir"), watched=tuple(config.get("watched") or ()))  # fmt: skip


#: progress-line names for log keys (others are shown under their own name)
SHORT_NAMES = {"mask_rate": "mask"}
_LOOP_KEYS = {"step", "epoch", "lr", "img_per_s", "global_batch", "global_ubatch", "world_size", "time",
              "best_test_acc", "best_val_acc", "test_acc_at_best_val", "val_acc", "test_acc"}  # fmt: skip
_LOOP_KEYS |= {"params", "macs", "latency_ms"}  # the model's cost (raykd.train.cost): in result.json, not each line


def format_progress(rec: dict[str, Any], steps: int) -> str:
    """One progress line: step, the losses and the method's logs, validation/test accuracy, speed."""
    parts = [f"step {rec['step']:>{len(str(steps))}}/{steps}"]
    logs = [k for k in rec if k not in _LOOP_KEYS]
    for key in [*logs, "val_acc", "test_acc"]:
        v = rec.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            digits = 3 if key.startswith("loss") else 4
            parts.append(f"{SHORT_NAMES.get(key, key)} {v:.{digits}f}")
    if "img_per_s" in rec:
        parts.append(f"{rec['img_per_s']:.0f} img/s")
    return " | ".join(parts)


class _ProgressTail(threading.Thread):
    """Prints new lines of ``progress.jsonl`` while the trainer runs."""

    def __init__(self, path: Path, steps: int, out=None, prefix: str = ""):
        super().__init__(daemon=True)
        self.path, self.steps, self.out = path, steps, out or sys.stdout  # resolved now, not at import
        self.prefix = prefix
        self.pos = path.stat().st_size if path.exists() else 0
        self.stop = threading.Event()

    def poll(self) -> None:
        if not self.path.exists():
            return
        with open(self.path) as f:
            f.seek(self.pos)
            chunk = f.read()
        lines = chunk.split("\n")
        self.pos += len(chunk) - len(lines[-1])  # keep a partial last line for the next poll
        for line in lines[:-1]:
            try:
                rec = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                continue  # a line cut short by a crash; RunFolder.progress warns about it
            if isinstance(rec, dict):
                print(self.prefix + format_progress(rec, self.steps), file=self.out, flush=True)

    def run(self) -> None:
        while not self.stop.wait(0.5):
            self.poll()
        self.poll()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _reachable(address: str, timeout_s: float = 10.0) -> None:
    """Raise ConnectionError unless a ``host:port`` address accepts TCP connections (``auto`` and
    ``ray://`` addresses are left to Ray)."""
    host, sep, port = address.rpartition(":")
    if "://" in address or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConnectionError(f"nothing answers at {address}: {e.strerror or e}") from None


def init_ray(
    num_cpus_needed: float, address: str | None = None, verbose: bool = False, include_dashboard: bool = False
) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``), or start a private local Ray with enough logical CPUs
    (never the cluster a ``ray start --head`` left running on this machine: join that one with
    ``--address auto``), listening on 127.0.0.1 only (:func:`loopback_only`).

    A local Ray with the dashboard on gets its own dashboard port, and every process of the job is
    told that address (``RAY_API_SERVER_ADDRESS``).  Ray Train's placement-group cleaner queries the
    State API without an address; with a second local Ray on the machine (another study, a test
    session) that lookup fails ("multiple active Ray instances"), a stopped trial's placement group is
    never freed and the study hangs.
    """
    import ray

    if ray.is_initialized():
        return
    common = {"log_to_driver": verbose, "logging_level": "INFO" if verbose else "ERROR"}
    if address or os.environ.get("RAY_ADDRESS"):
        where = address or os.environ["RAY_ADDRESS"]
        if where.startswith("ray://"):
            from raykd.errors import ConfigError

            raise ConfigError("--address" if address else "RAY_ADDRESS", "Ray Client (ray://) is not supported: run "
                              "raykd on the head node (ray attach / ray exec) with --address auto")  # fmt: skip
        try:
            _reachable(where)  # ray.init retries an unreachable GCS for minutes
            ray.init(address=where, **common)
        except ConnectionError as e:
            from raykd.errors import ConfigError

            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            field = "--address" if address else "RAY_ADDRESS"
            raise ConfigError(
                field,
                f"cannot join the Ray cluster at {where!r} ({first}); start one with `ray start "
                "--head` or `ray up cluster.yaml`, or leave it out to start a local Ray",
            ) from None
        return
    extra: dict[str, Any] = {}
    if include_dashboard:
        port = _free_port()
        extra = {"dashboard_port": port,
                 "runtime_env": {"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}}}  # fmt: skip
    # address="local": always a private instance; without it ray.init() joins a cluster that `ray start --head`
    # left on this machine, and then refuses num_cpus
    with loopback_only():
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(num_cpus_needed)),
                 include_dashboard=include_dashboard, **extra, **common)  # fmt: skip
    if verbose:
        print(f"started a private local Ray (node address {ray.util.get_node_ip_address()})", flush=True)


#: Ray's switch (read by ``ray._private.services.get_node_ip_address``) that makes a node take 127.0.0.1
#: as its address, as Ray does on macOS and Windows; every server then binds loopback only
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def loopback_only():
    """While a private local Ray starts: make it listen on 127.0.0.1 only.

    Ray's servers (GCS, raylet and object manager, every worker's gRPC server, the dashboard agent,
    the runtime-env agent, the dashboard when on) bind 127.0.0.1 when the node's address is
    127.0.0.1, and all interfaces otherwise.  ``ray.init(_node_ip_address="127.0.0.1")`` does not get
    there (Ray replaces a loopback address by the machine's routable one); Ray's switch for
    single-machine use does: the node address is then 127.0.0.1, the processes Ray starts are told
    so, and so is Ray Train's ``MASTER_ADDR`` for gloo/nccl.  The switch is a module constant read
    at import (Ray is imported already) and its environment variable; both are put back afterwards,
    so that nothing this process starts later (a `ray start --address`, which the switch refuses)
    inherits them."""
    from ray._private import ray_constants

    before = (os.environ.get(LOOPBACK_ENV), getattr(ray_constants, "ENABLE_RAY_CLUSTER", None))
    os.environ[LOOPBACK_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if before[0] is None:
            os.environ.pop(LOOPBACK_ENV, None)
        else:
            os.environ[LOOPBACK_ENV] = before[0]
        if before[1] is not None:
            ray_constants.ENABLE_RAY_CLUSTER = before[1]


def build_trainer(
    cfg: RunConfig,
    run_dir: Path,
    teacher_dir: str | Path | None,
    *,
    callbacks: list | None = None,
    stop_at: int | None = None,
    controller_failure_limit: int = 1,
    storage_path: str | None = None,
    watched: tuple[str, ...] = (),
):
    """The ``TorchTrainer`` of one run, sized by ``cfg.scaling`` (gloo on CPU, nccl on GPU).

    Its Train run is named ``train`` under ``run_dir`` (or under ``storage_path``, a shared folder or
    cloud URI, when given): a new trainer for the same folder resumes the latest checkpoint.
    ``raykd train`` and multi-worker study trials (with ``TuneReportCallback``) both build it here.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    s, t = cfg.scaling, cfg.train
    resources = worker_bundle(cfg)  # CPUs, GPUs when use_gpu, and scaling.resources_per_worker
    return TorchTrainer(
        _worker_fn,
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            "run_dir": str(run_dir),
            "stop_at": stop_at,
            "teacher_dir": str(teacher_dir) if teacher_dir else None,
            "watched": list(watched),
        },
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=TRAIN_RUN_NAME,
            storage_path=storage_path or str(run_dir),
            callbacks=callbacks or [],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints),
            failure_config=ray.train.FailureConfig(
                max_failures=t.max_failures, controller_failure_limit=controller_failure_limit
            ),
        ),
    )


def raise_if_diverged(folder: RunFolder) -> None:
    """Raise :class:`~raykd.errors.DivergedError` when the run folder records a divergence."""
    failure = folder.failure()
    if failure is not None:
        raise DivergedError(str(failure.get("reason")), failure.get("step"), str(folder.path))


class CtrlC:
    """raykd's own SIGINT handler for ``trainer.fit()`` in the main thread.

    Ray Train (2.58) installs a handler that aborts its controller and then calls ``sys.exit(0)``,
    which Ray's ``ray.get`` turns into ``SystemExit(1)``: a Ctrl-C looked like a crash (exit 1, nothing
    said).  This one takes the place of Ray's (the trainer's ``_register_sigint_handler``): the first
    Ctrl-C asks the controller to abort (it stops the workers; checkpoints already reported are kept)
    and records the interrupt, so that ``fit`` ending in the controller's death is read as a Ctrl-C; a
    second Ctrl-C stops waiting at once.  Ray's own processes block SIGINT, so a Ctrl-C in the
    terminal reaches only this driver.  The previous handler is put back by :meth:`restore`.
    """

    def __init__(self, trainer) -> None:
        self.count = 0
        self.previous = signal.getsignal(signal.SIGINT)
        if hasattr(trainer, "_register_sigint_handler"):
            trainer._register_sigint_handler = self._register

    def _register(self, controller) -> None:
        def handler(signum, frame) -> None:
            self.count += 1
            if self.count > 1:
                raise KeyboardInterrupt
            print("stopping the workers (Ctrl-C again to stop at once)…", flush=True)
            controller.abort.remote()  # the controller exits when done; fit's ray.get then fails

        signal.signal(signal.SIGINT, handler)

    def restore(self) -> None:
        if threading.current_thread() is threading.main_thread() and self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def run_training(
    cfg: RunConfig,
    run_dir: str | Path,
    address: str | None = None,
    verbose: bool = False,
    out=None,
    stop_at: int | None = None,
    teacher_dir: Path | None = None,
    prefix: str = "",
) -> dict[str, Any]:
    """Run ``cfg`` with a ``TorchTrainer`` sized by ``cfg.scaling``; return the last metrics.
    ``prefix`` starts every progress line (``teacher: `` while a teacher trains).

    ``result.json`` exists only once the run reached ``train.steps`` (``stop_at`` interrupts it after
    that step's checkpoint, as a kill would; tests use it).
    """
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    s, t = cfg.scaling, cfg.train
    init_ray(s.num_workers * s.cpus_per_worker, address, verbose)
    trainer = build_trainer(cfg, run_dir, teacher_dir, stop_at=stop_at, controller_failure_limit=1)
    tail = _ProgressTail(run_dir / PROGRESS_FILE, t.steps, out, prefix)
    tail.start()
    started = time.time()
    ctrl_c = CtrlC(trainer)
    try:
        try:
            result = trainer.fit()
        except BaseException:
            if ctrl_c.count:  # whatever fit ended with (the aborted controller's death, Ray's SystemExit)
                raise KeyboardInterrupt from None
            raise
    finally:
        ctrl_c.restore()
        tail.stop.set()
        tail.join()
    metrics = {k: v for k, v in (result.metrics or {}).items() if not k.startswith("_")}
    metrics["wall_s"] = time.time() - started
    folder = RunFolder(run_dir)
    raise_if_diverged(folder)
    # result.json was written by rank 0 at the last step; add what only the driver knows
    folder.update_result(wall_s=metrics["wall_s"], checkpoint=folder.relative(result.checkpoint.path if
                                                                              result.checkpoint else None))  # fmt: skip
    return metrics
