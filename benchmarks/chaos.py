"""Chaos: a study on a two-node Ray cluster on this machine loses its worker node mid-trial and gets
it back; prints what the faults cost.

The head (`ray start --head`, 1 CPU) runs the driver; the second node (1 CPU and a custom resource
``chaos: 1``) runs every trial, because each trial asks for ``chaos: 1``
(``scaling.resources_per_worker``).  While a trial is between evaluations, the second node's whole
process group is SIGKILLed (what a preempted machine looks like to Ray), and after ``--down-s``
seconds a new node with the same resources starts.  The study (``tune.max_failures: 3``, a
checkpoint at every evaluation) must finish every trial.

Checked and printed: every trial finished; Optuna (``optuna.db``, read with the optuna API) agrees
with the study folder trial by trial (state COMPLETE and the value of ``result.json``); per fault,
the steps redone (last step recorded before the fault minus the step the trial resumed from) and
the time lost (from the kill to the trial's next evaluation, minus one normal evaluation interval).

    .venv/bin/python benchmarks/chaos.py [--trials 4] [--steps 400] [--eval-every 50] [--faults 2]

Only processes this script starts are stopped (their process groups), never `ray stop`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from raykd.testing import free_ports, kill_group, start_ray_node, stop_ray_nodes, wait_ray_node


def start_node(root: Path, name: str, head_port: int, resources: dict, head: bool) -> subprocess.Popen:
    """A `ray start --block` node of the chaos cluster, once it is up."""
    proc = start_ray_node(root, name, head_port, resources, head)
    wait_ray_node(proc, root / f"{name}.log", timeout_s=120)
    return proc


def kill_node(proc: subprocess.Popen) -> None:
    """SIGKILL a node at once: its `ray start` process and everything below it (raylet, agents, the
    workers that run trials), as a machine that disappears."""
    from raykd.testing import process_tree

    for pid in process_tree(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    kill_group(proc)
    proc.wait()


def rows(trial_dir: Path) -> list[dict]:
    out = []
    path = trial_dir / "progress.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--faults", type=int, default=2, help="faults, each in another trial")
    ap.add_argument("--down-s", type=float, default=5.0, help="seconds the node stays away")
    ap.add_argument("--timeout-s", type=float, default=900.0)
    args = ap.parse_args(argv)

    import optuna
    import yaml

    from raykd.testing import tiny_run_config

    root = Path(tempfile.mkdtemp(prefix="rkc", dir="/tmp"))  # short: Ray's AF_UNIX paths live under it
    work = Path(tempfile.mkdtemp(prefix="raykd-chaos-"))
    head_port = free_ports(1)[0]
    procs: list[subprocess.Popen] = []
    driver = None
    started = time.time()
    try:
        procs.append(start_node(root, "head", head_port, {}, head=True))
        procs.append(start_node(root, "node1", head_port, {"chaos": 1}, head=False))
        base = tiny_run_config("fixmatch", train={"steps": args.steps, "eval_every": args.eval_every},
                               scaling={"resources_per_worker": {"chaos": 1}})  # fmt: skip
        raw = {"name": "chaos", "base": base.model_dump(mode="json", exclude={"provenance"}),
               "search": {"method.threshold": {"uniform": [0.7, 0.99]}},
               "tune": {"num_samples": args.trials, "max_concurrent": 1, "metric": "val_acc", "scheduler": "none",
                        "max_failures": 3}}  # fmt: skip
        study_file = work / "chaos.yaml"
        study_file.write_text(yaml.safe_dump(raw))
        d = work / "runs" / "chaos"
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS"] = "0"
        log = open(work / "driver.log", "w")  # noqa: SIM115 - closed below
        driver = subprocess.Popen([sys.executable, "-m", "raykd.cli", "study", "run", str(study_file), "--storage",
                                   str(work / "runs"), "--address", f"127.0.0.1:{head_port}"],
                                  stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)  # fmt: skip
        faults: list[dict] = []
        faulted: set[str] = set()
        deadline = started + args.timeout_s
        while driver.poll() is None:
            if time.time() > deadline:
                raise RuntimeError(f"the study did not finish in {args.timeout_s:.0f} s")
            if len(faults) < args.faults:
                for t in sorted(d.glob("trials/*")):
                    r = rows(t)
                    if t.name in faulted or (t / "result.json").exists() or len(r) < 2:
                        continue
                    if r[-1]["step"] > args.steps - 2 * args.eval_every:
                        continue
                    # between two evaluations: half an interval after the last one
                    gap = (r[-1]["time"] - r[0]["time"]) / max(1, len(r) - 1)
                    time.sleep(gap / 2)
                    before = rows(t)
                    t_kill = time.time()
                    kill_node(procs[-1])
                    time.sleep(args.down_s)
                    procs.append(start_node(root, f"node{len(procs)}", head_port, {"chaos": 1}, head=False))
                    faults.append({"trial": t.name, "t_kill": t_kill, "last_step_before": before[-1]["step"],
                                   "interval_s": gap, "back_after_s": time.time() - t_kill})  # fmt: skip
                    faulted.add(t.name)
                    break
            time.sleep(0.2)
        log.close()
        wall = time.time() - started
        output = (work / "driver.log").read_text()
        if driver.returncode != 0:
            raise RuntimeError(f"study run exited {driver.returncode}:\n{output[-4000:]}")

        trials = sorted(d.glob("trials/*"))
        results = {t.name: json.loads((t / "result.json").read_text()) for t in trials if (t / "result.json").exists()}
        ot = optuna.load_study(study_name="chaos", storage=f"sqlite:///{d / 'optuna.db'}")
        by_id = {tr.user_attrs.get("raykd_trial_id"): tr for tr in ot.trials}
        agree = {
            t.name: t.name in by_id and by_id[t.name].state.name == "COMPLETE"
            and t.name in results and abs(by_id[t.name].value - results[t.name]["val_acc"]) < 1e-12
            for t in trials
        }  # fmt: skip
        for f in faults:
            r = rows(d / "trials" / f["trial"])
            kept = [x["step"] for x in r if x["time"] < f["t_kill"]]
            again = [x for x in r if x["time"] > f["t_kill"]]
            f["resumed_from"] = kept[-1] if kept else 0
            f["steps_redone"] = f["last_step_before"] - f["resumed_from"]
            f["next_eval_after_s"] = again[0]["time"] - f["t_kill"] if again else None
            f["time_lost_s"] = f["next_eval_after_s"] - f["interval_s"] if again else None
            steps = [x["step"] for x in r]
            f["progress_unique"] = steps == sorted(set(steps))
            del f["t_kill"]
        summary = {
            "trials": args.trials, "finished": len(results),
            "optuna_agrees": all(agree.values()) and len(agree) == args.trials,
            "optuna_trials": len(ot.trials), "faults": faults, "eval_every": args.eval_every, "steps": args.steps,
            "wall_s": wall, "rc": driver.returncode,
        }  # fmt: skip
        print(json.dumps(summary, indent=2))
        return summary
    finally:
        if driver is not None and driver.poll() is None:
            kill_group(driver)
            driver.wait()
        stop_ray_nodes(procs)
        shutil.rmtree(root, ignore_errors=True)
        if os.environ.get("RAYKD_CHAOS_KEEP"):
            print(f"study folder kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
