"""raykd on a Ray cluster: cluster.yaml (and its GCP / on-prem variants) against the schema Ray ships,
the arithmetic of trial resource requests, --storage / --address checks, a study whose storage is a
URI, and a real two-node cluster on this machine running a study whose two trials land on different
nodes."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from raykd.cli import main
from raykd.config import RunConfig
from raykd.errors import ConfigError
from raykd.testing import RAY, free_ports, start_ray_node, stop_ray_nodes, tiny_run_config, wait_ray_node
from raykd.tune.resources import DRIVER_CPU, concurrency, trial_needs, trial_resources, trials_that_fit, worker_bundle

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"


# --------------------------------------------------------------------------------------------
# cluster.yaml against Ray's own validator


def cluster_variant(name: str) -> dict:
    """cluster.yaml as written (AWS), or with the keys of its commented ``# >>> NAME`` block replaced
    (``null`` deletes a key), as docs/cluster.md tells a GCP or on-prem user to do."""
    text = CLUSTER_YAML.read_text()
    cfg = yaml.safe_load(text)
    if name == "AWS":
        return cfg
    m = re.search(rf"^# >>> {name}\b[^\n]*\n(.*?)^# <<< {name}\b", text, re.S | re.M)
    assert m, f"no {name} block in cluster.yaml"
    block = yaml.safe_load("\n".join(line[2:] if line.startswith("# ") else line[1:] for line in m[1].splitlines()))
    for key, value in block.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    return cfg


def ray_validate(cfg: dict) -> dict:
    """What `ray up` does before it talks to a cloud: merge the provider's defaults, then validate the
    result against ray/autoscaler/ray-schema.json (Ray's own validator, from the installed package)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


@pytest.mark.parametrize("variant", ["AWS", "GCP", "LOCAL"])
def test_cluster_yaml_validates_against_the_schema_ray_ships(variant):
    prepared = ray_validate(cluster_variant(variant))
    assert prepared["provider"]["type"] == {"AWS": "aws", "GCP": "gcp", "LOCAL": "local"}[variant]
    if variant != "LOCAL":  # on-prem machines have no node types; their resources come from `ray start`
        types = prepared["available_node_types"]
        assert types[prepared["head_node_type"]]["resources"] == {"CPU": 0}  # the head runs no training
        assert types["gpu_1x"]["resources"]["GPU"] == 1 and types["gpu_8x"]["resources"]["GPU"] == 8
        assert types["gpu_1x"]["resources"]["gpu_1x"] == 1 and types["gpu_8x"]["resources"]["gpu_8x"] == 8
    else:
        assert "--num-cpus=0" in " ".join(prepared["head_start_ray_commands"])


def test_the_validator_rejects_what_ray_up_would_reject():
    import jsonschema

    bad_key = cluster_variant("AWS")
    bad_key["available_node_types"]["gpu_1x"]["min_worker"] = 1  # misspelt
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        ray_validate(bad_key)
    fractional = cluster_variant("AWS")
    fractional["available_node_types"]["gpu_1x"]["resources"]["GPU"] = 0.5  # node resources are whole numbers
    with pytest.raises(jsonschema.ValidationError):
        ray_validate(fractional)


def test_cluster_yaml_installs_pinned_raykd_and_mounts_code_data_and_shared_storage():
    cfg = cluster_variant("AWS")
    setup = " ".join(cfg["setup_commands"])
    assert "-c ~/raykd/constraints.txt -e ~/raykd" in setup  # raykd with the pinned versions on every node
    assert cfg["file_mounts"]["~/raykd"] == "."  # the repository, studies/ included
    assert "/data" in cfg["file_mounts"]  # pre-staged datasets
    assert "/mnt/shared" in " ".join(cfg["initialization_commands"])  # the shared study storage
    assert ".venv" in cfg["rsync_exclude"] and "runs" in cfg["rsync_exclude"]


# --------------------------------------------------------------------------------------------
# trial resource arithmetic (docs/cluster.md, "Packing")


def node(name: str) -> dict[str, float]:
    return {k: float(v) for k, v in cluster_variant("AWS")["available_node_types"][name]["resources"].items()}


def run_cfg(**scaling) -> RunConfig:
    return tiny_run_config("fixmatch", scaling=scaling, train={"batch_size": 16})


SMALL = {"use_gpu": True, "gpus_per_worker": 0.25, "cpus_per_worker": 2, "resources_per_worker": {"gpu_1x": 0.25}}
DDP8 = {"num_workers": 8, "use_gpu": True, "gpus_per_worker": 1, "cpus_per_worker": 11,
        "resources_per_worker": {"gpu_8x": 1}}  # fmt: skip


def test_quarter_gpu_trials_pack_four_per_gpu():
    cfg = run_cfg(**SMALL)
    assert trial_resources(cfg) == {"CPU": 2, "GPU": 0.25, "gpu_1x": 0.25}  # an inline trial holds its worker's share
    assert trial_needs(cfg) == trial_resources(cfg)
    assert trials_that_fit(cfg, [node("gpu_1x")]) == 4
    assert trials_that_fit(cfg, [node("gpu_1x")] * 8) == 32
    assert trials_that_fit(cfg, [node("head")]) == 0  # CPU 0: the head runs no trial
    assert trials_that_fit(cfg, [node("gpu_8x")]) == 0  # pinned to the single-GPU type
    # the scarcest resource decides: 4 CPUs per trial on an 8-CPU node leave 2 of 4 GPU quarters idle
    assert trials_that_fit(run_cfg(**{**SMALL, "cpus_per_worker": 4}), [node("gpu_1x")]) == 2
    # a third of a GPU: Ray keeps 4 decimals (0.3333 x 3 <= 1), so 3 fit, not 2
    assert trials_that_fit(run_cfg(use_gpu=True, gpus_per_worker=1 / 3, cpus_per_worker=1), [node("gpu_1x")]) == 3


def test_eight_one_gpu_workers_take_a_whole_8_gpu_node():
    cfg = run_cfg(**DDP8)
    assert worker_bundle(cfg) == {"CPU": 11, "GPU": 1, "gpu_8x": 1}
    assert trial_resources(cfg) == {"CPU": DRIVER_CPU}  # the trial process only drives the TorchTrainer
    assert trial_needs(cfg) == {"CPU": 8 * 11 + DRIVER_CPU, "GPU": 8, "gpu_8x": 8}
    assert trials_that_fit(cfg, [node("gpu_8x")]) == 1
    assert trials_that_fit(cfg, [node("gpu_8x"), node("gpu_8x"), node("head")]) == 2
    assert trials_that_fit(cfg, [node("gpu_1x")] * 8) == 0  # pinned: never spread over single-GPU nodes
    unpinned = run_cfg(**{**DDP8, "resources_per_worker": {}, "cpus_per_worker": 7})
    assert trials_that_fit(unpinned, [node("gpu_1x")] * 8) == 1  # unpinned, Ray may spread one over 8 nodes
    # ... but not when the workers take every CPU: the trial's own process needs a sliver of one too
    assert (
        trials_that_fit(run_cfg(**{**DDP8, "resources_per_worker": {}, "cpus_per_worker": 8}), [node("gpu_1x")] * 8)
        == 0
    )
    # 12 bundles' worth of GPUs on two nodes of 8 is still one 8-worker trial at a time (4 + 4 left over)
    assert trials_that_fit(run_cfg(**{**DDP8, "resources_per_worker": {}}), [{"CPU": 96, "GPU": 6}] * 2) == 1


def test_the_packing_table_in_the_docs_is_what_raykd_computes():
    rows = re.findall(
        r"^\| `(\{.*\})` \| (\d+) \| (\d+) \| (\d+) \| (\d+) \|$", (ROOT / "docs" / "cluster.md").read_text(), re.M
    )
    assert len(rows) >= 8
    layouts = [[node("gpu_1x")], [node("gpu_1x")] * 8, [node("gpu_8x")], [node("gpu_8x")] * 2]
    for scaling, *cells in rows:
        cfg = run_cfg(**yaml.safe_load(scaling))
        assert [trials_that_fit(cfg, nodes) for nodes in layouts] == [int(c) for c in cells], scaling


def test_concurrency_keeps_an_explicit_cap_on_a_joined_cluster_for_the_autoscaler():
    cfg = run_cfg(**SMALL)
    head_only = [node("head")]  # a fresh `ray up` cluster: GPU workers start on demand
    totals = node("head")
    assert concurrency(cfg, 16, 8, totals, head_only, joined=True) == 8
    assert concurrency(cfg, 3, 8, totals, head_only, joined=True) == 3
    with pytest.raises(ConfigError, match="tune.max_concurrent"):
        concurrency(cfg, 16, None, totals, head_only, joined=True)
    with pytest.raises(ConfigError, match="base.scaling"):
        concurrency(cfg, 16, 8, totals, head_only, joined=False)  # a local Ray never grows
    two = [node("gpu_1x"), node("gpu_1x")]
    assert concurrency(cfg, 16, None, {}, two, joined=True) == 8
    assert concurrency(cfg, 16, 5, {}, two, joined=False) == 5


# --------------------------------------------------------------------------------------------
# bad --storage / --address / scaling: one line, exit 2, before any work


def study_file(tmp_path: Path, name="s", scaling=None, **tune) -> Path:
    base = tiny_run_config("fixmatch", train={"steps": 4, "eval_every": 2}).model_dump(
        mode="json", exclude={"provenance"}
    )
    base["scaling"].update(scaling or {})  # unchecked here: the CLI must catch bad values
    raw = {"name": name, "base": base,
           "search": {"method.threshold": {"uniform": [0.7, 0.99]}},
           "tune": {"num_samples": 2, "scheduler": "none", "metric": "val_acc", **tune}}  # fmt: skip
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def one_line_exit_2(capsys, argv: list[str], field: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"raykd: error: {field}:" in err, err
    return err


@pytest.mark.parametrize(
    ("storage", "says"),
    [("", "empty"), ("ftp://host/runs", "unsupported URI scheme"), ("s3://", "names no bucket"),
     ("memory://x/y", "unsupported URI scheme")],
)  # fmt: skip
def test_bad_storage_is_one_line_exit_2(tmp_path, capsys, storage, says):
    err = one_line_exit_2(capsys, ["study", "run", str(study_file(tmp_path)), "--storage", storage], "tune.storage")
    assert says in err


def test_ablations_need_a_folder_not_a_uri(tmp_path, capsys):
    base = tiny_run_config("fixmatch").model_dump(mode="json", exclude={"provenance"})
    path = tmp_path / "abl.yaml"
    path.write_text(yaml.safe_dump({"name": "a", "base": base, "grid": {"train.lr": [0.01]}}))
    one_line_exit_2(capsys, ["ablate", str(path), "--storage", "s3://bucket/runs"], "storage")


def test_a_uri_study_cannot_train_its_teacher_on_the_head(tmp_path, capsys):
    base = tiny_run_config("kd", train={"steps": 4, "eval_every": 2})
    raw = {"name": "kd", "base": base.model_dump(mode="json", exclude={"provenance"}),
           "search": {"method.temperature": "default"}, "tune": {"num_samples": 1}}  # fmt: skip
    path = tmp_path / "kd.yaml"
    path.write_text(yaml.safe_dump(raw))
    one_line_exit_2(capsys, ["study", "run", str(path), "--storage", "s3://bucket/runs"], "base.teacher.run")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_address_where_nothing_listens_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    study = str(study_file(tmp_path))
    started = time.time()
    one_line_exit_2(capsys, ["study", "run", study, "--address", f"127.0.0.1:{free_port()}"], "--address")
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{free_port()}")
    one_line_exit_2(capsys, ["study", "run", study, "--storage", str(tmp_path / "r2")], "RAY_ADDRESS")
    assert time.time() - started < 30  # Ray itself would retry an unreachable head for minutes
    monkeypatch.delenv("RAY_ADDRESS")
    err = one_line_exit_2(capsys, ["study", "run", study, "--address", "ray://head:10001"], "--address")
    assert "Ray Client" in err


@pytest.mark.parametrize(
    ("scaling", "field"),
    [({"use_gpu": True, "gpus_per_worker": 1.5}, "base.scaling.gpus_per_worker"),
     ({"resources_per_worker": {"GPU": 1}}, "base.scaling.resources_per_worker"),
     ({"resources_per_worker": {"gpu_1x": 0}}, "base.scaling.resources_per_worker")],
)  # fmt: skip
def test_bad_resource_requests_are_one_line_exit_2(tmp_path, capsys, scaling, field):
    one_line_exit_2(capsys, ["study", "run", str(study_file(tmp_path, scaling=scaling))], field)


def test_train_with_cluster_resources_needs_a_cluster(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = tiny_run_config("fixmatch", scaling={"resources_per_worker": {"gpu_1x": 1}})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude={"provenance"})))
    one_line_exit_2(capsys, ["train", str(path), "--out", str(tmp_path / "r")], "scaling.resources_per_worker")


# --------------------------------------------------------------------------------------------
# a study whose storage is a URI (pyarrow's file:// filesystem stands in for a bucket)


@pytest.mark.ray
def test_uri_storage_keeps_a_working_copy_and_copies_it_to_the_bucket(tmp_path, ray_local, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the working copy is runs/<name> where raykd runs
    bucket = tmp_path / "bucket"
    argv = ["study", "run", str(study_file(tmp_path, name="uri")), "--storage", f"file://{bucket}"]
    assert main(argv) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert f"copied runs/uri to file://{bucket}/uri" in out
    work, remote = tmp_path / "runs" / "uri", bucket / "uri"
    # Ray wrote the experiment and the inline trials' checkpoints straight to the bucket
    assert (remote / "tune" / "tuner.pkl").exists() and not (work / "tune").exists()
    assert list((remote / "tune").glob("*/checkpoint_*/state.pt"))
    # the driver rebuilt each trial folder from Tune's results and copied everything to the bucket
    for root in (work, remote):
        results = sorted(root.glob("trials/*/result.json"))
        assert len(results) == 2, root
        for path in results:
            result = json.loads(path.read_text())
            assert result["step"] == 4 and 0 <= result["val_acc"] <= 1 and len(result["node_id"]) == 56
            steps = [json.loads(x)["step"] for x in (path.parent / "progress.jsonl").read_text().splitlines()]
            assert steps == [2, 4]
            assert yaml.safe_load((path.parent / "config.yaml").read_text())["method"]["name"] == "fixmatch"
        assert (root / "study.yaml").exists() and (root / "optuna.db").exists() and (root / "best.yaml").exists()
    states = json.loads((work / "trial_states.json").read_text())  # what `study status` shows for live trials
    assert sorted(states.values()) == ["TERMINATED", "TERMINATED"]
    # the trials' own run folders were scratch on their node, removed when they finished
    scratch = Path(tempfile.gettempdir()) / "raykd" / "uri" / "trials"
    assert not any((scratch / p.parent.name).exists() for p in work.glob("trials/*/result.json"))
    # status and export read the working copy
    assert main(["study", "status", str(work)]) == 0
    assert capsys.readouterr().out.count(" done ") == 2
    shutil.rmtree(work)  # a new machine: the name is still taken, in the bucket
    err = one_line_exit_2(capsys, argv, "--name")
    assert f"already exists in file://{bucket}/uri" in err


# --------------------------------------------------------------------------------------------
# a real two-node Ray cluster on this machine


#: nodes stopped at the end of a test leave at once (no graceful drain)
DRAIN_NOW = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}


def _node_id(tmp: Path, name: str) -> str:
    """The node's id, from the port files Ray writes into that node's own session folder."""
    (node_id,) = {p.name.rsplit("_", 1)[1] for p in (tmp / name).glob("session_*/*_port_*")}
    return node_id


def _leftovers(tmp: Path) -> list[int]:
    """Processes whose command line names our temp dir (ours only: the folder is unique)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if str(tmp).encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


@pytest.mark.ray
def test_two_node_cluster_runs_a_study_with_one_trial_on_each_node(tmp_path):
    """A head (`ray start --head`) and a second node (`ray start --address`), each with one
    `raykd_slot` and one CPU; the study's trials ask for a slot each, so its two concurrent trials
    must run on different nodes.  raykd joins with --address, as on a cluster started by `ray up`."""
    tmp = Path(tempfile.mkdtemp(prefix="rk", dir="/tmp"))  # short: AF_UNIX paths under it stay < 107 chars
    head_port, procs = free_ports(1)[0], []
    started = time.time()
    try:
        procs.append(start_ray_node(tmp, "head", head_port, {"raykd_slot": 1}, head=True, **DRAIN_NOW))
        wait_ray_node(procs[0], tmp / "head.log")
        procs.append(start_ray_node(tmp, "node2", head_port, {"raykd_slot": 1}, head=False, **DRAIN_NOW))
        wait_ray_node(procs[1], tmp / "node2.log")
        nodes = {_node_id(tmp, "head"), _node_id(tmp, "node2")}
        assert len(nodes) == 2

        study = study_file(tmp_path, name="twonode", scaling={"resources_per_worker": {"raykd_slot": 1}})
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        res = subprocess.run(
            [sys.executable, "-m", "raykd.cli", "study", "run", str(study), "--storage", str(tmp_path / "runs"),
             "--address", f"127.0.0.1:{head_port}"],
            capture_output=True, text=True, timeout=240, env={**env, "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0"},
        )  # fmt: skip
        assert res.returncode == 0, res.stdout + res.stderr
        assert "2 trial(s) at a time" in res.stdout, res.stdout
        d = tmp_path / "runs" / "twonode"
        results = [json.loads(p.read_text()) for p in d.glob("trials/*/result.json")]
        assert len(results) == 2
        assert {r["node_id"] for r in results} == nodes  # one trial on the head, one on the second node
        assert (d / "best.yaml").exists()
    finally:
        stop_ray_nodes(procs)
        stray = _leftovers(tmp)
        for pid in stray:  # belt and braces: only processes that name our own temp dir
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        print(f"two-node test: {time.time() - started:.1f} s; stray processes after stopping: {stray}")
        shutil.rmtree(tmp, ignore_errors=True)
    assert not stray, f"processes of our nodes survived their process groups: {stray}"


LOOPBACK = ("127.0.0.1", "::ffff:127.0.0.1", "::1")


@pytest.mark.ray
def test_train_beside_a_local_ray_start_head_starts_its_own_loopback_only_ray(tmp_path):
    """`ray start --head` left running on this machine (in a temp root of its own, RAY_TMPDIR, so
    that a plain ray.init() of this process would find it as `ray start` leaves it for everyone) must
    not catch `raykd train` without --address: the run uses a private Ray, whose every listening
    socket is on loopback but the DDP rendezvous store of its rank 0 (2 workers, gloo)."""
    from raykd.testing import listening_sockets, process_tree

    root = Path(tempfile.mkdtemp(prefix="rk", dir="/tmp"))  # short: AF_UNIX paths under it stay < 107 chars
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(root), RAY_USAGE_STATS_ENABLED="0", RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS="0")
    port, p = free_ports(1)[0], free_ports(6)
    head = subprocess.Popen(
        [RAY, "start", "--block", "--head", f"--port={port}", "--num-cpus=1", "--num-gpus=0", "--disable-usage-stats",
         "--include-dashboard=false", "--include-log-monitor=false", "--object-store-memory=80000000",
         f"--node-manager-port={p[0]}", f"--object-manager-port={p[1]}", f"--dashboard-agent-listen-port={p[2]}",
         f"--dashboard-agent-grpc-port={p[3]}", f"--runtime-env-agent-port={p[4]}", f"--metrics-export-port={p[5]}"],
        stdout=open(root / "head.log", "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True,  # noqa: SIM115
    )  # fmt: skip
    try:
        wait_ray_node(head, root / "head.log")
        assert (root / "ray" / "ray_current_cluster").read_text().strip().endswith(f":{port}")
        (head_node,) = {f.name.rsplit("_", 1)[1] for f in (root / "ray").glob("session_*/*_port_*")}
        cfg = tiny_run_config("fixmatch", train={"steps": 40, "eval_every": 10}, scaling={"num_workers": 2})
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude={"provenance"})))
        out = tmp_path / "out"
        train = subprocess.Popen([sys.executable, "-m", "raykd.cli", "train", str(path), "--out", str(out)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
        sockets = []
        while train.poll() is None:
            if (out / "progress.jsonl").exists() and not sockets:  # the workers train: gloo is up
                sockets = listening_sockets(process_tree(train.pid))
            time.sleep(0.2)
        stdout, stderr = train.communicate()
        assert train.returncode == 0, stdout + stderr
        result = json.loads((out / "result.json").read_text())
        assert result["node_id"] != head_node  # trained on a Ray of its own, not on the running head
        assert sockets, "no listening socket seen while the run trained"
        names = {name for _, name, _, _ in sockets}
        assert {"gcs_server", "raylet"} <= names, sockets
        wide = [s for s in sockets if s[2] not in LOOPBACK]
        # the one exception: torch's TCPStore (the DDP rendezvous at MASTER_ADDR:MASTER_PORT, held by rank 0
        # while the run trains) binds every interface whatever MASTER_ADDR is (docs/cluster.md)
        assert len(wide) <= 1 and all(name.startswith("ray::RayTrainWo") for _, name, _, _ in wide), sockets
    finally:
        stop_ray_nodes([head])
        stray = [pid for pid in _leftovers(root) if pid != os.getpid()]
        for pid in stray:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(root, ignore_errors=True)
    assert not stray, f"processes named after our temp root survived: {stray}"
