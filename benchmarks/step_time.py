"""Step time of FixMatch in raykd vs a plain single-process PyTorch loop of the same math.

For each model (WRN-28-2 on 32×32×3 images, small_cnn on 8×8 digits) this measures images/s of one
FixMatch train step at batch B + 2·μB (B = 64, μ = 7 by default: 64 labeled + 448 weak + 448 strong
images through one forward/backward):

* **raykd**: ``raykd.train.trainer.run_training`` — a Ray Train ``TorchTrainer`` with one worker
  running raykd's loop (sampling, on-device augmentation, the method, SGD, EMA, log windows).  The
  figure is the loop's own ``img_per_s`` of the evaluation window after the warm-up window, so Ray's
  start-up (a one-off cost per run, about 15 s) is excluded and reported separately.
* **plain**: the same math written out here in one process — the same data tensors, the same
  batched augmentation, one concatenated forward pass, CE + thresholded pseudo-label CE, SGD with
  Nesterov, cosine LR, EMA — with nothing else around it.

The ratio (time per step of raykd over plain, medians of per-window figures) is measured in one run; target
≤ 1.05.  The script also prints the augmentation throughput of the batched on-device pipeline vs a
per-sample torchvision loop (target ≥ 5×).

    python benchmarks/step_time.py                 # CPU, both models
    python benchmarks/step_time.py --device cuda --amp --steps 50
    python benchmarks/step_time.py --models small_cnn --steps 40
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from augment_bench import bench_augment  # noqa: E402

from raykd.config import parse_run_config  # noqa: E402
from raykd.data import prepare_data  # noqa: E402
from raykd.data.augment import Augmenter  # noqa: E402
from raykd.models import build_model  # noqa: E402

SETUPS = {
    "wrn_28_2": {"data": "cifar10", "size": 32, "channels": 3},
    "small_cnn": {"data": "digits", "size": 8, "channels": 1},
}


def write_cifar10_folder(root: Path, n_train: int = 5000, n_test: int = 1000, seed: int = 0) -> Path:
    """Random images in torchvision's CIFAR-10 layout (timing needs the shapes, not the pictures)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    per = n_train // 5
    for i in range(1, 6):
        batch = {b"data": rng.integers(0, 256, (per, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, per))}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
    test = {b"data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n_test))}
    (folder / "test_batch").write_bytes(pickle.dumps(test))
    return root


def run_config(model: str, root: str | None, window: int, windows: int, args) -> object:
    """Run config with one warm-up window then ``windows`` measured windows of ``window`` steps."""
    setup = SETUPS[model]
    gpu = args.device == "cuda"
    return parse_run_config(
        {
            "data": {"name": setup["data"], "root": root, "labels_per_class": 25, "seed": 0},
            "model": {"name": model},
            "method": {"name": "fixmatch"},
            "train": {"steps": window * (windows + 1), "batch_size": args.batch, "uratio": args.uratio,
                      "eval_every": window, "seed": 0, "amp": args.amp, "channels_last": gpu},
            "scaling": {"num_workers": 1, "use_gpu": gpu, "cpus_per_worker": args.threads},
        }
    )  # fmt: skip


def bench_raykd(cfg, tmp: Path) -> tuple[list[float], float]:
    """img/s of each measured window (the loop's own figure, evaluation excluded) and the run's wall
    time including Ray's start-up."""
    from raykd.train.trainer import run_training

    run_dir = tmp / f"raykd-{cfg.model.name}"
    t0 = time.perf_counter()
    with open(os.devnull, "w") as quiet:
        run_training(cfg, run_dir, out=quiet)
    wall = time.perf_counter() - t0
    records = [json.loads(x) for x in (run_dir / "progress.jsonl").read_text().splitlines()]
    return [r["img_per_s"] for r in records[1:]], wall


def bench_plain(cfg, threads: int, device: str, channels_last: bool | None = None, compile: bool = False,
                peak: dict | None = None) -> list[float]:
    """The same FixMatch math in a bare loop; img/s of each measured window.

    ``channels_last``: the model and its inputs in channels_last (None: on CUDA only); ``compile``:
    the model through ``torch.compile`` (compiled in the warm-up window); bf16 autocast follows
    ``cfg.train.amp``.  With ``peak`` (a dict) on CUDA, ``peak["bytes"]`` gets the peak allocated
    GPU memory of the run."""
    dev = torch.device(device)
    torch.set_num_threads(threads)
    t = cfg.train
    data = prepare_data(cfg.data.name, cfg.data.root, cfg.data.labels_per_class, 0, 0)
    c, h, _ = data.image_shape
    torch.manual_seed(0)
    model = build_model(cfg.model.name, data.num_classes, c, h, bn_momentum=0.01).to(dev)
    channels_last = dev.type == "cuda" if channels_last is None else channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    ema = [p.detach().clone() for p in model.parameters()]
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0}],
                          lr=t.lr, momentum=0.9, nesterov=True)  # fmt: skip
    aug = Augmenter(hflip=data.hflip, mean=data.mean, std=data.std)
    gen = torch.Generator(device=dev).manual_seed(0)
    b, n = t.batch_size, t.batch_size * t.uratio
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (t.amp and dev.type == "cuda") else None
    forward = torch.compile(model) if compile else model

    def step(k: int) -> None:
        li = torch.randint(len(data.labeled), (b,))
        ui = torch.randint(len(data.unlabeled), (n,))
        x, y = data.labeled.images[li].to(dev), data.labeled.labels[li].to(dev)
        u = data.unlabeled.images[ui].to(dev)
        inputs = torch.cat([aug.weak(x, gen), aug.weak(u, gen), aug.strong(u, gen)])
        if channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        for g in opt.param_groups:
            g["lr"] = t.lr * np.cos(7 * np.pi * k / (16 * t.steps))
        if autocast is not None:
            with autocast:
                logits = forward(inputs)
        else:
            logits = forward(inputs)
        logits = logits.float()
        z_l, z_w, z_s = logits[:b], logits[b : b + n], logits[b + n :]
        conf, pseudo = z_w.detach().softmax(-1).max(-1)
        mask = (conf >= 0.95).float()
        loss = F.cross_entropy(z_l, y) + (F.cross_entropy(z_s, pseudo, reduction="none") * mask).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 0.001)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    window, rates = t.eval_every, []
    for w in range(t.steps // window):
        sync()
        t0 = time.perf_counter()
        for k in range(w * window, (w + 1) * window):
            step(k)
        sync()
        if w:  # the first window is the warm-up
            rates.append(window * (b + 2 * n) / (time.perf_counter() - t0))
    if peak is not None and dev.type == "cuda":
        peak["bytes"] = torch.cuda.max_memory_allocated(dev)
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (GPU)")
    p.add_argument("--window", type=int, default=None, help="steps per window (default 2 for WRN on CPU, else 10)")
    p.add_argument("--windows", type=int, default=3, help="measured windows (after one warm-up window)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads on both sides (= cpus_per_worker)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--uratio", type=int, default=7)
    p.add_argument("--skip-augment", action="store_true")
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="raykd-bench-"))
    cifar = str(write_cifar10_folder(tmp / "cifar"))
    rows = []
    for model in args.models:
        window = args.window or (2 if (model == "wrn_28_2" and args.device == "cpu") else 10)
        root = cifar if SETUPS[model]["data"] == "cifar10" else None
        cfg = run_config(model, root, window, args.windows, args)
        plain = bench_plain(cfg, args.threads, args.device)
        raykd, wall = bench_raykd(cfg, tmp)
        plain += bench_plain(cfg, args.threads, args.device)  # before and after: the machine's drift shows
        p_med, r_med = statistics.median(plain), statistics.median(raykd)
        rows.append((model, window * args.windows, p_med, r_med, p_med / r_med, wall, plain, raykd))
        print(f"{model}: plain windows {[round(x) for x in plain]} img/s, raykd windows {[round(x) for x in raykd]} "
              f"img/s", flush=True)  # fmt: skip

    amp = ", bf16 autocast" if args.amp else ""
    print(f"\nFixMatch train step, batch {args.batch} + 2x{args.uratio}x{args.batch}, device {args.device}, "
          f"{args.threads} CPU thread(s){amp}, torch {torch.__version__}")  # fmt: skip
    print(
        "| model | steps measured | plain PyTorch img/s (median) | raykd via Ray Train, 1 worker, img/s (median) "
        "| time ratio raykd/plain | raykd wall s incl. Ray start |"
    )
    print("|---|---|---|---|---|---|")
    for model, steps, p_med, r_med, ratio, wall, _, _ in rows:
        print(f"| {model} | {steps} | {p_med:.0f} | {r_med:.0f} | {ratio:.3f} | {wall:.1f} |")
    if not args.skip_augment:
        print("\nStrong augmentation, batched on the device vs a per-sample torchvision loop (batch 448):")
        print("| images | raykd img/s | torchvision img/s | ratio |")
        print("|---|---|---|---|")
        for size, channels in ((32, 3), (28, 1), (8, 1)):
            r = bench_augment(batch=448, size=size, channels=channels, device=args.device)
            print(f"| {size}x{size}x{channels} | {r['raykd_img_s']:.0f} | {r['torchvision_img_s']:.0f} | "
                  f"{r['ratio']:.1f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
