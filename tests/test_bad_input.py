"""Bad input stops before anything starts: one line naming the field (or flag, or file) and the fix,
exit code 2, before Ray starts and before any file is written — for every class of mistake a new user
makes (checks that used to come late, values that were accepted but wrong, raw Python exceptions,
files given to the wrong command)."""

from __future__ import annotations

import json

import pytest
import yaml

import raykd.train.trainer as trainer
import raykd.tune.ablation as ablation
import raykd.tune.study as study
from raykd.cli import main
from raykd.testing import tiny_run_config


@pytest.fixture
def no_ray(monkeypatch):
    """Reaching Ray (or a Tune run) is a failure of these tests: everything must be refused before."""

    def reached(*args, **kwargs):
        raise AssertionError("Ray was reached")

    for module, name in ((trainer, "run_training"), (trainer, "init_ray"), (study, "run"), (ablation, "run")):
        monkeypatch.setattr(module, name, reached)


def refused(tmp_path, monkeypatch, capsys, argv: list[str]) -> str:
    """Run the CLI in an empty folder; assert exit 2, one stderr line and nothing written; return the line."""
    work = tmp_path / "cwd"
    work.mkdir(exist_ok=True)
    monkeypatch.chdir(work)
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("raykd: error: "), err
    assert list(work.iterdir()) == [], "a file was written"
    return err[0][len("raykd: error: ") :]


def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return str(path)


RUN_CASES = {  # file text -> the start of the one line (field first)
    # checks that used to come after Ray started or the run folder was written
    "model: {name: small_cnn, width: -3}\nmethod: {name: supervised}\n": "model: small_cnn cannot be built",
    "method: {name: fixmatch}\ntrain: {uratio: 0}\n": "train.uratio: 0 gives fixmatch no unlabeled images",
    "method: {name: layermatch}\ntrain: {uratio: 0}\n": "train.uratio: 0 gives layermatch",
    "method: {name: kd}\nteacher: {checkpoint: /nonexistent/teacher}\n": "teacher.checkpoint:",
    # values that were accepted but wrong
    "method: {name: supervised}\ntrain: {steps: 40, steps: 4000}\n": "{path}: not valid YAML at line 2: the key",
    "method: {name: supervised}\ntrain: {lr: .inf}\n": "train.lr: Input should be a finite number",
    "method: {name: fixmatch, threshold: .nan}\n": "method.threshold:",
    "method: {name: supervised}\ntrain: {weight_decay: .nan}\n": "train.weight_decay: Input should be a finite number",
    "method: {name: supervised}\nmodel: {bn_momentum: 1.5}\n": "model.bn_momentum: Input should be less",
    "method: {name: supervised}\nmodel: {bn_momentum: 0}\n": "model.bn_momentum: Input should be greater",
    "method: {name: supervised}\ntrain: {steps: 100000000000000000000000}\n": "train.steps: Input should be less",
    "method: {name: supervised}\ntrain: {batch_size: 1000000000}\n": "train.batch_size: Input should be less",
    "method: {name: supervised}\ndata: {seed: 1180591620717411303424}\n": "data.seed: Input should be less",
    "method: {name: supervised}\ntrain: {seed: -1}\n": "train.seed: Input should be greater",
    "method: {name: supervised}\ndata: {name: digits, root: /tmp}\n": "data.root: digits is built into",
    # a file given to the wrong command
    "name: s\nbase: {method: {name: fixmatch}}\nsearch: {method.threshold: default}\n": "{path}: is a study config, "
    "not a run config; use `raykd study run",
    "name: a\nbase: {method: {name: fixmatch}}\ngrid: {method.threshold: [0.9]}\n": "{path}: is an ablation config",
}


@pytest.mark.parametrize("text", list(RUN_CASES), ids=[f"run{i}" for i in range(len(RUN_CASES))])
def test_raykd_train_refuses_before_anything_starts(tmp_path, monkeypatch, capsys, no_ray, text):
    path = write(tmp_path, "run.yaml", text)
    line = refused(tmp_path, monkeypatch, capsys, ["train", path])
    assert line.startswith(RUN_CASES[text].format(path=path)), line


def test_unreadable_config_files_are_named(tmp_path, monkeypatch, capsys, no_ray):
    bad = write(tmp_path, "latin1.yaml", b"method: {name: supervised}  # caf\xe9\n")
    line = refused(tmp_path, monkeypatch, capsys, ["train", bad])
    assert line == f"{bad}: is not UTF-8 text (byte 33); save it as UTF-8"
    assert refused(tmp_path, monkeypatch, capsys, ["train", str(tmp_path)]).startswith(f"{tmp_path}: is a folder")
    missing = str(tmp_path / "missing.yaml")
    assert refused(tmp_path, monkeypatch, capsys, ["train", missing]).startswith(f"{missing}: no such file")


@pytest.mark.parametrize("address", ["foo", "bad:port", "http//x", "10.0.0.1"])
def test_a_malformed_address_is_refused_before_ray(tmp_path, monkeypatch, capsys, no_ray, address):
    path = write(tmp_path, "run.yaml", "method: {name: supervised}\ntrain: {steps: 2}\n")
    line = refused(tmp_path, monkeypatch, capsys, ["train", path, "--address", address])
    assert line.startswith(f"--address: {address!r} is not a Ray address; use auto"), line


def test_study_and_ablation_files_refuse_the_same_classes(tmp_path, monkeypatch, capsys, no_ray):
    base = "{data: {val_per_class: 2}, model: {name: small_cnn, width: -3}, method: {name: supervised}}"
    s = write(tmp_path, "s.yaml", f"name: s\nbase: {base}\nsearch: {{train.lr: default}}\n")
    assert refused(tmp_path, monkeypatch, capsys, ["study", "run", s]).startswith("base.model: small_cnn cannot")
    a = write(tmp_path, "a.yaml", f"name: a\nbase: {base}\ngrid: {{train.lr: [0.1]}}\n")
    assert refused(tmp_path, monkeypatch, capsys, ["ablate", a]).startswith("base.model: small_cnn cannot")
    dup = write(tmp_path, "d.yaml", "name: s\nname: t\nbase: {method: {name: supervised}}\n")
    assert "the key 'name' appears twice" in refused(tmp_path, monkeypatch, capsys, ["study", "run", dup])
    run = write(tmp_path, "r.yaml", "method: {name: supervised}\n")
    assert refused(tmp_path, monkeypatch, capsys, ["study", "run", run]).startswith(f"{run}: is a run config")
    assert refused(tmp_path, monkeypatch, capsys, ["ablate", s]).startswith(f"{s}: is a study config")
    ok_base = "{data: {val_per_class: 2}, method: {name: supervised}}"
    ok = write(tmp_path, "ok.yaml", f"name: s\nbase: {ok_base}\nsearch: {{train.lr: default}}\n")
    assert refused(tmp_path, monkeypatch, capsys, ["study", "run", ok, "--address", "nope"]).startswith("--address")


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["train", "x.yaml", "--bogus"], "unrecognized arguments: --bogus (see `raykd train --help`)"),
        (["study", "status", "--bogus", "x"], "unrecognized arguments: --bogus (see `raykd study status --help`)"),
        (["study", "export", "x", "--out", "y", "--top-k", "0"], "argument --top-k: 0 is not 1 or more"),
        (["methods", "--colour"], "unrecognized arguments: --colour (see `raykd methods --help`)"),
    ],
)
def test_usage_errors_point_at_the_subcommands_help(capsys, argv, expected):
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and expected in err[0], err


def test_version_and_every_subcommand_has_a_description_and_examples(capsys):
    import raykd
    from raykd.cli import COMMANDS

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"raykd {raykd.__version__}"
    for key in COMMANDS:
        with pytest.raises(SystemExit) as info:
            main([*key.split(), "--help"])
        out = capsys.readouterr().out
        assert info.value.code == 0
        assert COMMANDS[key][1].split(".")[0] in " ".join(out.split()), key
        assert "examples:\n  raykd " in out, key


def test_every_subcommand_accepts_verbose(tmp_path, capsys):
    """The generic error line says 'rerun with --verbose': every subcommand must accept it."""
    for argv in (["study", "status"], ["study", "export"], ["report"], ["methods"]):
        extra = ["--out", str(tmp_path / "o.yaml")] if argv[-1] == "export" else []
        target = [] if argv == ["methods"] else [str(tmp_path / "none")]
        assert main([*argv, *target, *extra, "--verbose"]) in (0, 2), argv
    capsys.readouterr()


def _study_folder(tmp_path):
    """A finished one-trial study folder written by hand (the files `raykd study run` leaves)."""
    d = tmp_path / "study"
    cfg = tiny_run_config("supervised", data={"val_per_class": 1}).model_dump(mode="json", exclude={"provenance"})
    (d / "trials" / "t0").mkdir(parents=True)
    (d / "study.yaml").write_text(yaml.safe_dump({"name": "st", "base": cfg, "search": {"train.lr": "default"},
                                                  "tune": {"num_samples": 1, "metric": "val_acc"}}))  # fmt: skip
    (d / "trials" / "t0" / "config.yaml").write_text(yaml.safe_dump(cfg))
    (d / "trials" / "t0" / "params.json").write_text(json.dumps({"train.lr": 0.03}))
    row = {"step": cfg["train"]["steps"], "val_acc": 0.5, "test_acc": 0.4, "loss": 1.0}
    (d / "trials" / "t0" / "progress.jsonl").write_text(json.dumps(row) + "\n")
    (d / "trials" / "t0" / "result.json").write_text(json.dumps(row))
    return d


def test_study_export_never_overwrites_a_stranger_and_refuses_a_folder(tmp_path, monkeypatch, capsys):
    d = _study_folder(tmp_path)
    out = tmp_path / "best.yaml"
    assert main(["study", "export", str(d), "--out", str(out)]) == 0, capsys.readouterr().err
    assert out.read_text().startswith("# exported by raykd from study st, ")
    assert main(["study", "export", str(d), "--out", str(out)]) == 0  # its own earlier export: replaced
    notes = tmp_path / "notes.yaml"
    notes.write_text("mine: true\n")
    capsys.readouterr()
    assert main(["study", "export", str(d), "--out", str(notes)]) == 2
    assert "exists and is not an export of study st" in capsys.readouterr().err
    assert notes.read_text() == "mine: true\n"
    assert main(["study", "export", str(d), "--out", str(notes), "--force"]) == 0
    assert main(["study", "export", str(d), "--out", str(tmp_path)]) == 2
    assert f"--out: {tmp_path} is a folder" in capsys.readouterr().err


def test_an_exported_config_trains_into_a_folder_named_after_its_study(tmp_path, monkeypatch):
    from raykd.cli import resolve_run_dir

    monkeypatch.chdir(tmp_path)
    d, resuming = resolve_run_dir("runs/quickstart/best.yaml", None, {"provenance": {"study": "quickstart"}})
    assert d.as_posix() == "runs/quickstart-best" and not resuming
    d, _ = resolve_run_dir("runs/other/best.yaml", None, {"provenance": {"study": "other"}})
    assert d.as_posix() == "runs/other-best"
    d, _ = resolve_run_dir("my_run.yaml", None, {})
    assert d.as_posix() == "runs/my_run"


def test_an_empty_search_or_grid_says_so(tmp_path, monkeypatch, capsys, no_ray):
    s = write(tmp_path, "s.yaml", "name: s\nbase: {method: {name: supervised}}\nsearch: {}\n")
    assert refused(tmp_path, monkeypatch, capsys, ["study", "run", s]) == "search: is empty; give at least 1 entry"
    a = write(tmp_path, "a.yaml", "name: a\nbase: {method: {name: supervised}}\ngrid: {}\n")
    assert refused(tmp_path, monkeypatch, capsys, ["ablate", a]) == "grid: is empty; give at least 1 entry"


def test_eval_every_beyond_steps_is_a_warning_not_an_error(capsys):
    from raykd.train.preflight import warnings_of

    cfg = tiny_run_config("supervised", train={"steps": 10, "eval_every": 100})
    assert warnings_of(cfg) == [
        "train.eval_every (100) > train.steps (10): the run evaluates and checkpoints only at its last step; "
        "a lost worker restarts it from step 0"
    ]
    assert warnings_of(cfg, "base.")[0].startswith("base.train.eval_every (100) > base.train.steps (10)")
    assert warnings_of(tiny_run_config("supervised", train={"steps": 10, "eval_every": 5})) == []
