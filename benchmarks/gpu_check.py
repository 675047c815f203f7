"""One command for a GPU node: what the machine is and how fast raykd trains on it.

Records the device, driver (``nvidia-smi`` when present), torch, CUDA and cuDNN versions, then
measures and writes ``gpu_check.json`` and ``gpu_check.md`` to ``--out``:

* **step time**: raykd's FixMatch step (the loop in-process: sampling, on-device augmentation, the
  method, SGD, EMA, log windows; WRN-28-2, 64 labeled + 448 weak + 448 strong images) against the
  plain loop of the same math from ``benchmarks/step_time.py``, in eager fp32, bf16 autocast,
  bf16 + channels_last and bf16 + channels_last + ``torch.compile`` (on CPU: eager and compiled only,
  autocast and channels_last being GPU options), with the peak GPU memory of each and the hours
  2^20 steps (FixMatch's schedule) would take at the measured step time;
* **augmentation**: the batched strong augmentation's throughput on the device
  (``benchmarks/augment_bench.py``), in its default mode for the device and the other one;
* **Ray**: one short ``raykd train`` and a 2-trial ``raykd study run`` (``scaling.use_gpu: true``,
  half a GPU per trial on CUDA; CPU otherwise), timed end to end with Ray's start.

    bash benchmarks/gpu_check.sh                         # on a GPU node (< 5 min)
    python benchmarks/gpu_check.py --device cpu --tiny   # anywhere: small_cnn on digits, a few steps

Images are random (timing needs shapes, not pictures); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from augment_bench import bench_augment  # noqa: E402
from step_time import bench_plain, run_config, write_cifar10_folder  # noqa: E402

from raykd.train.context import LocalSession  # noqa: E402
from raykd.train.loop import train_loop  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXMATCH_STEPS = 2**20
#: (name, bf16 autocast, channels_last, torch.compile); the GPU options are skipped on CPU
VARIANTS = [
    ("eager fp32", False, False, False),
    ("bf16 autocast", True, False, False),
    ("bf16 + channels_last", True, True, False),
    ("bf16 + channels_last + compile", True, True, True),
]
CPU_VARIANTS = [("eager fp32", False, False, False), ("compile", False, False, True)]


def environment(device: torch.device) -> dict:
    """What this machine is: device, driver, versions."""
    env = {
        "device": str(device),
        "host": platform.node(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "gpu": None,
        "gpu_memory_gib": None,
        "nvidia_smi": None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = props.name
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["gpu_count"] = torch.cuda.device_count()
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        try:
            out = subprocess.run(query, capture_output=True, text=True, timeout=30)
            env["nvidia_smi"] = out.stdout.strip() or out.stderr.strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            env["nvidia_smi"] = f"failed: {e}"
    return env


def sizes(args) -> dict:
    """Model, data, batch and windows of the step benchmark."""
    if args.tiny:
        return {"model": "small_cnn", "batch": 8, "uratio": 2, "window": args.window or 3, "windows": args.windows}
    window = args.window or (2 if args.device == "cpu" and args.model == "wrn_28_2" else 20)
    return {"model": args.model, "batch": args.batch, "uratio": args.uratio, "window": window, "windows": args.windows}


def step_config(size: dict, root: str | None, device: str, amp: bool, channels_last: bool, compile: bool):
    ns = SimpleNamespace(device=device, batch=size["batch"], uratio=size["uratio"], amp=amp, threads=1)
    cfg = run_config(size["model"], root, size["window"], size["windows"], ns)
    train = cfg.train.model_copy(update={"channels_last": channels_last, "compile": compile})
    return cfg.model_copy(update={"train": train})


def bench_loop(cfg, device: torch.device, run_dir: Path) -> tuple[list[float], int | None]:
    """raykd's loop in-process: img/s of each measured window (the loop's own figure, evaluation
    excluded) and the peak allocated GPU memory."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_loop(cfg, LocalSession(run_dir, device), run_dir)
    records = [json.loads(x) for x in (run_dir / "progress.jsonl").read_text().splitlines()]
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return [r["img_per_s"] for r in records[1:]], peak


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else 0.5 * (xs[len(xs) // 2 - 1] + xs[len(xs) // 2])


def bench_steps(args, device: torch.device, tmp: Path, root: str | None) -> list[dict]:
    size = sizes(args)
    images = size["batch"] * (1 + 2 * size["uratio"])
    variants = VARIANTS if device.type == "cuda" else CPU_VARIANTS
    rows = []
    for name, amp, channels_last, compile in variants:
        if compile and "compile" in args.skip:
            continue
        cfg = step_config(size, root, device.type, amp, channels_last, compile)
        torch._dynamo.reset()
        peak: dict = {}
        plain = bench_plain(cfg, 1, device.type, channels_last=channels_last, compile=compile, peak=peak)
        torch._dynamo.reset()
        loop, loop_peak = bench_loop(cfg, device, tmp / f"loop-{len(rows)}")
        p, r = median(plain), median(loop)
        step_s = images / r
        rows.append({
            "variant": name, "model": size["model"], "batch": f"{size['batch']} + 2x{size['uratio']}x{size['batch']}",
            "steps_measured": size["window"] * size["windows"], "plain_img_s": p, "raykd_img_s": r,
            "ratio_raykd_over_plain": p / r, "raykd_step_ms": 1000 * step_s,
            "hours_for_2^20_steps": step_s * FIXMATCH_STEPS / 3600,
            "plain_windows": plain, "raykd_windows": loop,
            "peak_gpu_mib_plain": peak["bytes"] / 2**20 if "bytes" in peak else None,
            "peak_gpu_mib_raykd": loop_peak / 2**20 if loop_peak is not None else None,
        })  # fmt: skip
        print(f"  {name}: plain {p:.0f} img/s, raykd {r:.0f} img/s, ratio {p / r:.3f}", flush=True)
    return rows


def bench_augmentation(args, device: torch.device) -> list[dict]:
    shape = (8, 1) if args.tiny else (32, 3)
    batch = 64 if args.tiny else 448
    rows = []
    default = device.type == "cuda"
    for sync_free in (default, not default):
        r = bench_augment(batch=batch, size=shape[0], channels=shape[1], device=device.type,
                          repeats=2 if args.tiny else 5, sync_free=sync_free)  # fmt: skip
        mode = "sync-free (CUDA default)" if sync_free else "sorted chunks (CPU default)"
        rows.append({"images": f"{batch} x {shape[0]}x{shape[0]}x{shape[1]}", "mode": mode, **r})
    return rows


def _ray_base(args, device: torch.device, root: str | None) -> dict:
    gpu = device.type == "cuda"
    if args.tiny:
        data = {"name": "digits", "labels_per_class": 4, "val_per_class": 2, "seed": 0}
        model = {"name": "small_cnn", "width": 8}
        train = {"steps": 10, "batch_size": 8, "uratio": 2, "eval_every": 5, "eval_batch_size": 256}
    else:
        data = {"name": "cifar10", "root": root, "labels_per_class": 25, "val_per_class": 5, "seed": 0}
        model = {"name": "wrn_28_2"}
        train = {"steps": 200 if gpu else 4, "batch_size": 64, "uratio": 7, "eval_every": 100 if gpu else 2,
                 "amp": gpu, "channels_last": gpu}  # fmt: skip
    return {
        "data": data,
        "model": model,
        "method": {"name": "fixmatch"},
        "train": {**train, "seed": 0},
        "scaling": {"num_workers": 1, "use_gpu": gpu, "cpus_per_worker": 1, **({"gpus_per_worker": 1} if gpu else {})},
    }


def _timed(cmd: list[str], log: Path, timeout: int) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(":")}
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
        rc, text = out.returncode, out.stdout + out.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = 124, f"timed out after {timeout} s\n{e.stdout or ''}{e.stderr or ''}"
    log.write_text(text if isinstance(text, str) else text.decode(errors="replace"))
    lines = [x for x in str(text).splitlines() if x.strip()]
    return {"command": " ".join(cmd), "rc": rc, "wall_s": time.perf_counter() - t0,
            "last_line": lines[-1] if lines else "", "log": str(log)}  # fmt: skip


def bench_ray(args, device: torch.device, out: Path, root: str | None) -> dict:
    """One ``raykd train`` and a 2-trial ``raykd study run``, each a fresh process with its own Ray."""
    folder = out / "ray"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    base = _ray_base(args, device, root)
    (folder / "train.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
    raykd = [sys.executable, "-m", "raykd.cli"]
    results = {}
    if "train" not in args.skip:
        print("  raykd train ...", flush=True)
        results["train"] = _timed([*raykd, "train", str(folder / "train.yaml"), "--out", str(folder / "train_run")],
                                  folder / "train.log", args.ray_timeout)  # fmt: skip
    study_base = {**base, "scaling": {**base["scaling"]}}
    if device.type == "cuda":
        study_base["scaling"]["gpus_per_worker"] = 0.5  # two trials share the GPU
    study = {
        "name": "gpu_check_study",
        "base": study_base,
        "search": {"train.lr": {"loguniform": [0.01, 0.05]}},
        "tune": {"num_samples": 2, "metric": "val_acc", "mode": "max", "scheduler": "none", "max_concurrent": 2,
                 "seed": 0},
    }  # fmt: skip
    (folder / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    if "study" not in args.skip:
        print("  raykd study run (2 trials) ...", flush=True)
        results["study"] = _timed([*raykd, "study", "run", str(folder / "study.yaml"), "--storage", str(folder)],
                                  folder / "study.log", args.ray_timeout)  # fmt: skip
        gpus = study_base["scaling"].get("gpus_per_worker") if device.type == "cuda" else 0
        results["study"]["gpus_per_trial"] = gpus
    for r in results.values():
        r["steps_per_trial"] = base["train"]["steps"]
    return results


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = ["# raykd GPU check", "", f"`{report['command']}` ({report['date']}, {report['wall_s']:.0f} s in all)", ""]
    lines += ["| device | GPU | driver (nvidia-smi) | torch | CUDA | cuDNN | CPUs |", "|---|---|---|---|---|---|---|"]
    lines.append(f"| {env['device']} | {env['gpu'] or '-'} | {env['nvidia_smi'] or '-'} | {env['torch']} | "
                 f"{env['cuda'] or '-'} | {env['cudnn'] or '-'} | {env['cpus']} |")  # fmt: skip
    if report["steps"]:
        first = report["steps"][0]
        lines += ["", f"## FixMatch step: raykd's loop vs the plain loop ({first['model']}, batch {first['batch']})",
                  "", "| variant | steps measured | plain img/s | raykd img/s | time ratio raykd/plain | raykd ms/step "
                  "| hours for 2^20 steps | peak GPU MiB (plain / raykd) |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in report["steps"]:
            mem = "-"
            if r["peak_gpu_mib_raykd"] is not None:
                mem = f"{r['peak_gpu_mib_plain']:.0f} / {r['peak_gpu_mib_raykd']:.0f}"
            lines.append(f"| {r['variant']} | {r['steps_measured']} | {r['plain_img_s']:.0f} | "
                         f"{r['raykd_img_s']:.0f} | {r['ratio_raykd_over_plain']:.3f} | {r['raykd_step_ms']:.1f} | "
                         f"{r['hours_for_2^20_steps']:.1f} | {mem} |")  # fmt: skip
        best = min(report["steps"], key=lambda r: r["raykd_step_ms"])
        lines += ["", f"Projected: {FIXMATCH_STEPS} steps take {best['hours_for_2^20_steps']:.1f} h on this device "
                  f"({best['variant']}, {best['raykd_step_ms']:.1f} ms per step, evaluation excluded)."]  # fmt: skip
    if report["augment"]:
        lines += ["", "## Strong augmentation on the device vs per-sample torchvision (CPU)", "",
                  "| images | mode | raykd img/s | torchvision img/s | ratio |", "|---|---|---|---|---|"]  # fmt: skip
        for r in report["augment"]:
            lines.append(f"| {r['images']} | {r['mode']} | {r['raykd_img_s']:.0f} | {r['torchvision_img_s']:.0f} | "
                         f"{r['ratio']:.1f}x |")  # fmt: skip
    if report["ray"]:
        lines += ["", "## Through Ray (a fresh process each, Ray's start included)", "",
                  "| command | steps | GPUs per trial | rc | wall s | last line |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for kind, r in report["ray"].items():
            gpus = r.get("gpus_per_trial", "1" if report["environment"]["device"].startswith("cuda") else "0")
            last = r["last_line"].replace("|", "\\|")[:160]
            lines.append(f"| raykd {kind} | {r['steps_per_trial']} | {gpus} | {r['rc']} | {r['wall_s']:.1f} | {last} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="small_cnn on digits, a few steps (CPU smoke form)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "gpu_check"))
    p.add_argument("--model", default="wrn_28_2", choices=["wrn_28_2", "small_cnn"],
                   help="step benchmark model: wrn_28_2 (32x32x3 random CIFAR-10 layout) or small_cnn (digits)")
    p.add_argument("--batch", type=int, default=64, help="labeled batch B of the step benchmark")
    p.add_argument("--uratio", type=int, default=7, help="unlabeled ratio mu (B + 2 mu B images per step)")
    p.add_argument("--window", type=int, default=None, help="steps per window (default 20 on GPU, 2 on CPU, 3 tiny)")
    p.add_argument("--windows", type=int, default=3, help="measured windows after one warm-up window")
    p.add_argument("--skip", nargs="*", default=[], choices=["steps", "compile", "augment", "ray", "train", "study"],
                   help="parts to leave out (ray = both train and study)")
    p.add_argument("--ray-timeout", type=int, default=240, help="seconds for each Ray command")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA GPU (use --device cpu)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report: dict = {
        "command": " ".join(["python", "benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "environment": environment(device),
        "steps": [],
        "augment": [],
        "ray": {},
    }
    print(json.dumps(report["environment"], indent=1), flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="raykd-gpu-check-"))
    try:
        root = None if args.tiny or args.model == "small_cnn" else str(write_cifar10_folder(tmp / "cifar"))
        if "steps" not in args.skip:
            print("step time:", flush=True)
            report["steps"] = bench_steps(args, device, tmp, root)
        if "augment" not in args.skip:
            print("augmentation ...", flush=True)
            report["augment"] = bench_augmentation(args, device)
        if "ray" not in args.skip:
            print("Ray:", flush=True)
            report["ray"] = bench_ray(args, device, out, root)
    finally:
        report["wall_s"] = time.perf_counter() - t0
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
        (out / "gpu_check.md").write_text(markdown(report))
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n" + markdown(report))
    print(f"written: {out / 'gpu_check.json'}, {out / 'gpu_check.md'}")
    return 0 if all(r["rc"] == 0 for r in report["ray"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
