"""Helpers for raykd's own tests and for users' tests of new methods (shipped in the package so that
Ray workers can import them)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from raykd.config import RunConfig, parse_run_config


def tiny_run_config(method: str, /, **sections: dict[str, Any]) -> RunConfig:
    """A run config that trains ``method`` on digits for a handful of tiny CPU steps.

    Keyword arguments merge into the sections, e.g. ``train={"steps": 4}`` or ``method={"alpha": 0.5}``.
    A method that needs a teacher gets ``teacher.run``: a tiny supervised run (train it with
    :func:`tiny_teacher`).
    """
    from raykd.registry import METHODS

    raw: dict[str, Any] = {
        "data": {"name": "digits", "labels_per_class": 4, "val_per_class": 2, "seed": 0},
        "model": {"name": "small_cnn", "width": 8},
        "method": {"name": method},
        "train": {"steps": 2, "batch_size": 8, "uratio": 2, "eval_every": 2, "eval_batch_size": 256, "seed": 0},
        "scaling": {"num_workers": 1},
    }
    if METHODS.get(method).Config.needs_teacher:
        teacher = {k: dict(v) for k, v in raw.items() if k != "method"}
        teacher["method"] = {"name": "supervised"}
        teacher["train"].update(steps=20, eval_every=20)
        raw["teacher"] = {"run": teacher}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return parse_run_config(raw)


def tiny_teacher(cfg: RunConfig, cache_root: str | Path) -> Path | None:
    """Train ``cfg``'s teacher in-process (cached like the drivers do); its folder, or None."""
    from raykd.train.context import LocalSession
    from raykd.train.loop import train_loop
    from raykd.train.teacher import ensure_teacher

    return ensure_teacher(cfg, Path(cache_root), lambda tcfg, d: train_loop(tcfg, LocalSession(d), d))


def record_optimised(monkeypatch) -> list[torch.nn.Parameter]:
    """Patch the loop's optimiser constructor (pytest ``monkeypatch``) to record every parameter it is
    given; returns the list it fills, so a test can assert what is (and is not) optimised."""
    from raykd.train import loop

    optimised: list[torch.nn.Parameter] = []
    real_sgd = torch.optim.SGD

    def recording_sgd(groups, **kw):
        optimised.extend(p for g in groups for p in g["params"])
        return real_sgd(groups, **kw)

    monkeypatch.setattr(loop.torch.optim, "SGD", recording_sgd)
    return optimised


def flat_state(module: torch.nn.Module) -> torch.Tensor:
    """All parameters and floating buffers of ``module`` as one float64 vector."""
    parts = [p.detach().double().flatten().cpu() for p in module.parameters()]
    parts += [b.detach().double().flatten().cpu() for b in module.buffers() if b.is_floating_point()]
    return torch.cat(parts)


def ddp_probe_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: run the loop once per entry of ``config["runs"]`` (each a dict with ``config``,
    ``dir`` and ``teacher_dir``), then save this rank's weights and method state to
    ``<dir>/rank_<r>.pt`` so a test can check that the ranks agree.

    The runs share one worker group and one process group, so a test of every registered method pays
    for one worker start. Each run starts fresh: its progress goes to Ray Train, its checkpoints stay
    in its own folder (Ray Train V2 hands the latest reported checkpoint to the next ``get_checkpoint``,
    which would make the next run resume from another method's state).
    """
    from raykd.train.loop import train_loop
    from raykd.train.trainer import RayTrainSession

    class FreshSession(RayTrainSession):
        def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
            super().report(metrics, None)

        def latest_checkpoint(self) -> Path | None:
            return None

    for run in config["runs"]:
        cfg = parse_run_config(run["config"])
        out = Path(run["dir"])

        def dump(ctx, method, out=out) -> None:
            state = {"model": flat_state(ctx.raw_model), "method": method.state_dict()}
            torch.save(state, out / f"rank_{ctx.rank}.pt")
            (out / f"rank_{ctx.rank}.json").write_text(json.dumps({"world_size": ctx.world_size}))

        train_loop(cfg, FreshSession(), out, on_end=dump, teacher_dir=run.get("teacher_dir"))


#: tensor methods and torch functions that make the host wait for the device (their result, or its
#: shape, is only known once the device has computed it)
SYNCING_CALLS = frozenset(
    {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "__complex__", "cpu", "numpy", "nonzero",
     "argwhere", "unique", "unique_consecutive", "masked_select", "bincount", "equal", "allclose"}
)  # fmt: skip


def _has_bool_index(key: Any) -> bool:
    keys = key if isinstance(key, tuple) else (key,)
    return any(isinstance(k, torch.Tensor) and k.dtype == torch.bool for k in keys)


def _names_device(args: tuple, kwargs: dict) -> bool:
    if kwargs.get("device") is not None:
        return True
    return any(isinstance(a, torch.device | str | torch.Tensor) for a in args)


def host_sync_reason(func: Any, args: tuple, kwargs: dict) -> str | None:
    """Why calling ``func(*args, **kwargs)`` on CUDA tensors would synchronise the host with the device,
    or None.  Covers reading values back (``.item()``, ``bool()``, ``.tolist()``, ...), outputs whose
    shape depends on the data (``nonzero``, ``unique``, boolean-mask indexing, ``bincount``) and
    blocking copies (``.to(device)`` / ``.cuda()`` without ``non_blocking=True``, ``torch.tensor(data,
    device=...)`` and ``x.new_tensor(data)`` from host data)."""
    name = getattr(func, "__name__", "")
    if name in SYNCING_CALLS:
        return name
    if name == "repeat_interleave" and kwargs.get("output_size") is None:
        return name
    if name in ("__getitem__", "__setitem__") and len(args) > 1 and _has_bool_index(args[1]):
        return f"{name} with a boolean mask"
    if name == "index_put_" and len(args) > 1 and _has_bool_index(tuple(args[1])):
        return "index_put_ with a boolean mask"
    if name in ("to", "cuda") and not kwargs.get("non_blocking", False):
        if name == "cuda" or _names_device(args[1:], kwargs):
            if not (len(args) > 2 and args[2] is True):  # .to(device, dtype, non_blocking) positionally
                return f"blocking .{name}()"
    if name in ("tensor", "as_tensor", "asarray") and kwargs.get("device") is not None:
        if args and not isinstance(args[0], torch.Tensor):
            return f"torch.{name}(host data, device=...)"
    if name == "new_tensor" and len(args) > 1 and not isinstance(args[1], torch.Tensor):
        return "new_tensor(host data)"
    return None


class HostSyncCounter:
    """Records every call that would make the host wait for the device while it is active (a
    ``TorchFunctionMode``), with the first raykd (or user) source line below torch that made it.

    Runs on CPU, where nothing actually waits: it flags the calls that *would* synchronise on a GPU.
    ``host_files``: source files whose tensors live on the host by construction (the batch sampler's
    index tensors), whose calls are not counted.

        counter = HostSyncCounter()
        with counter:
            ...  # train steps
        assert not counter.hits, counter.hits
    """

    def __init__(self, host_files: tuple[str, ...] = ("raykd/train/sampler.py",)):
        from torch.overrides import TorchFunctionMode

        self.hits: list[tuple[str, str]] = []
        self.host_files = tuple(f.replace("/", os.sep) for f in host_files)
        counter = self

        class _Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                reason = host_sync_reason(func, args, kwargs)
                if reason is not None:
                    where = counter._caller()
                    if not where.startswith(counter.host_files):
                        counter.hits.append((reason, where))
                return func(*args, **kwargs)

        self._mode = _Mode()

    @staticmethod
    def _caller() -> str:
        frame = sys._getframe(2)
        root = str(Path(__file__).resolve().parents[1])
        while frame is not None:
            path = frame.f_code.co_filename
            if f"{os.sep}torch{os.sep}" not in path and path != __file__:
                rel = path[len(root) + 1 :] if path.startswith(root) else path
                return f"{rel}:{frame.f_lineno}"
            frame = frame.f_back
        return "?"

    def __enter__(self) -> HostSyncCounter:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)


def process_tree(root: int) -> list[int]:
    """``root`` and every process below it (from ``/proc``; Linux)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    todo, found = [root], []
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def listening_sockets(pids: list[int]) -> list[tuple[int, str, str, int]]:
    """``(pid, name, address, port)`` of every listening TCP socket the processes ``pids`` hold
    (``/proc/net/tcp`` and ``tcp6`` matched to their descriptors; Linux).  IPv6 addresses are as the
    kernel has them, e.g. ``::`` for all interfaces, ``::ffff:127.0.0.1`` for IPv4 loopback."""
    import socket

    listening: dict[str, tuple[str, int]] = {}
    for family, table in ((socket.AF_INET, "/proc/net/tcp"), (socket.AF_INET6, "/proc/net/tcp6")):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[3] != "0A":  # TCP_LISTEN
                continue
            addr_hex, port_hex = cols[1].split(":")
            raw = bytes.fromhex(addr_hex)
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))  # host-order words
            listening[cols[9]] = (socket.inet_ntop(family, raw), int(port_hex, 16))
    out = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            with open(f"/proc/{pid}/comm") as f:
                name = f.read().strip()
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and link[8:-1] in listening:
                out.add((pid, name, *listening[link[8:-1]]))
    return sorted(out)


# --------------------------------------------------------------------------------------------
# local multi-node Ray clusters (`ray start` processes on this machine) for tests and benchmarks

RAY = str(Path(sys.executable).with_name("ray"))


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now."""
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def start_ray_node(root: Path, name: str, head_port: int, resources: dict, head: bool, **env: str):
    """`ray start --block` as a child in its own process group, every port of its own, its own temp
    dir ``root/name`` (short: Ray's AF_UNIX socket paths live under it) and log ``root/name.log``;
    ``env`` is added to the node's environment.  Returns the process (see :func:`wait_ray_node`)."""
    import subprocess

    p = free_ports(7)
    args = [RAY, "start", "--block", "--disable-usage-stats", "--num-cpus=1", "--num-gpus=0",
            f"--resources={json.dumps(resources)}", f"--temp-dir={root / name}", "--object-store-memory=80000000",
            f"--node-manager-port={p[0]}", f"--object-manager-port={p[1]}", f"--dashboard-agent-listen-port={p[2]}",
            f"--dashboard-agent-grpc-port={p[3]}", f"--runtime-env-agent-port={p[4]}", f"--metrics-export-port={p[5]}",
            "--include-log-monitor=false"]  # fmt: skip
    if head:
        args += ["--head", f"--port={head_port}", "--include-dashboard=false", f"--ray-client-server-port={p[6]}"]
    else:
        args += [f"--address=127.0.0.1:{head_port}"]
    full_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    full_env.update(RAY_USAGE_STATS_ENABLED="0", **env)
    log = open(root / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)


def wait_ray_node(proc, log: Path, timeout_s: float = 60) -> None:
    """Wait until a `ray start --block` node is up; RuntimeError with its log if it dies or times out."""
    import time

    deadline = time.time() + timeout_s
    while "block forever" not in (log.read_text() if log.exists() else ""):
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"ray start did not come up in {timeout_s} s:\n{log.read_text()}")
        time.sleep(0.2)


def kill_group(proc, sig: int | None = None) -> None:
    """Signal (default SIGKILL) the process group of a process started with ``start_new_session``."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL if sig is None else sig)
    except ProcessLookupError:
        pass


def stop_ray_nodes(procs: list) -> None:
    """SIGTERM each `ray start --block` process group we started (never `ray stop`: other Ray
    instances may run on this machine), then SIGKILL what is left of those groups."""
    import signal
    import subprocess
    import time

    for proc in procs:
        kill_group(proc, signal.SIGTERM)
    deadline = time.time() + 20
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pass
        kill_group(proc)
        proc.wait()
