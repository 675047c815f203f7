"""Run-config validation, overrides and the CLI's bad-input contract (exit 2, one line, no Ray)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import yaml

from raykd.cli import main
from raykd.config import (
    TrainConfig,
    apply_overrides,
    dump_run_config,
    load_run_config,
    parse_run_config,
    read_yaml,
    search_range,
)
from raykd.errors import ConfigError
from raykd.methods import METHODS

BASE = {"data": {"name": "digits"}, "method": {"name": "fixmatch"}}


def error_of(raw) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_run_config(raw)
    return info.value


def with_(section: str, **values):
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    raw.setdefault(section, {}).update(values)
    return raw


def test_defaults_fill_a_minimal_config():
    cfg = parse_run_config(BASE)
    assert cfg.method.threshold == 0.95 and cfg.method.lambda_u == 1.0
    assert cfg.train.batch_size == 64 and cfg.train.uratio == 7 and cfg.scaling.num_workers == 1


def test_unknown_top_level_key_names_it_and_lists_allowed():
    err = error_of({**BASE, "trian": {}})
    assert err.field == "trian"
    assert "unknown key" in err.message and "train" in err.message and "scaling" in err.message


def test_unknown_nested_key_names_dotted_path():
    err = error_of(with_("train", stpes=10))
    assert err.field == "train.stpes"
    assert "steps" in err.message  # the allowed keys are listed


def test_wrong_type_names_field():
    err = error_of(with_("train", steps="many"))
    assert err.field == "train.steps"
    assert "'many'" in err.message


@pytest.mark.parametrize(
    ("section", "value", "field", "listed"),
    [
        ("method", {"name": "fixmach"}, "method.name", "fixmatch"),
        ("model", {"name": "wrn_28_3"}, "model.name", "wrn_28_2"),
        ("data", {"name": "cifar11"}, "data.name", "cifar10"),
    ],
)
def test_unknown_names_list_the_registered_choices(section, value, field, listed):
    raw = {**BASE, section: value}
    err = error_of(raw)
    assert err.field == field
    assert listed in err.message


def test_method_knobs_are_typed_and_bounded():
    assert error_of(with_("method", threshold=1.5)).field == "method.threshold"
    err = error_of(with_("method", treshold=0.9))
    assert err.field == "method.treshold" and "threshold" in err.message
    assert error_of(with_("method", hard_label="sometimes")).field == "method.hard_label"


def test_knobs_of_another_method_are_rejected():
    err = error_of({"method": {"name": "supervised", "threshold": 0.9}})
    assert err.field == "method.threshold"


def test_model_arguments_are_checked_against_the_builder():
    cfg = parse_run_config({**BASE, "model": {"name": "small_cnn", "width": 16}})
    assert cfg.model.args() == {"width": 16}
    err = error_of({**BASE, "model": {"name": "small_cnn", "widht": 16}})
    assert err.field == "model.widht" and "width" in err.message
    assert error_of({**BASE, "model": {"name": "small_cnn", "width": "wide"}}).field == "model.width"


def test_global_batch_must_split_evenly_across_workers():
    raw = with_("train", batch_size=64)
    raw["scaling"] = {"num_workers": 3}
    err = error_of(raw)
    assert err.field == "train.batch_size" and "num_workers" in err.message


def test_set_overrides_parse_yaml_scalars_and_are_type_checked():
    raw = apply_overrides(BASE, ["method.threshold=0.9", "train.amp=true", "data.root=null", "train.steps=7"])
    cfg = parse_run_config(raw)
    assert cfg.method.threshold == 0.9 and cfg.train.amp is True and cfg.data.root is None
    assert cfg.train.steps == 7
    assert BASE["method"] == {"name": "fixmatch"}  # the input is not mutated
    with pytest.raises(ConfigError) as info:
        parse_run_config(apply_overrides(BASE, ["train.steps=0.5"]))
    assert info.value.field == "train.steps"
    with pytest.raises(ConfigError) as info:
        apply_overrides(BASE, ["method.threshold"])
    assert info.value.field == "--set"
    with pytest.raises(ConfigError) as info:
        apply_overrides(BASE, ["method.name.sub=1"])
    assert info.value.field == "method.name"


def test_dumped_config_round_trips(tmp_path):
    cfg = parse_run_config({**BASE, "model": {"name": "small_cnn", "width": 16}})
    path = tmp_path / "run.yaml"
    path.write_text(dump_run_config(cfg))
    assert load_run_config(path) == cfg


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("data: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError) as info:
        read_yaml(path)
    assert info.value.field == str(path)
    with pytest.raises(ConfigError):
        read_yaml(tmp_path / "missing.yaml")


def test_every_declared_search_range_is_well_formed():
    for name in METHODS.names():
        cfg_cls = METHODS.get(name).Config
        for knob in cfg_cls.model_fields:
            rng = search_range(cfg_cls, knob)
            if rng is None:
                continue
            ((dist, bounds),) = rng.items()
            default = cfg_cls.model_fields[knob].default
            if default is None:  # derived at run time (slam.alpha_min = 1/classes, layermatch.avg_momentum per mode)
                assert len(set(bounds)) == len(bounds) > 1, (name, knob)
            elif dist == "choice":
                assert default in bounds, (name, knob)
            else:
                lo, hi = bounds
                assert lo < hi and lo <= default <= hi, (name, knob)
                if dist.startswith("log"):
                    assert lo > 0, (name, knob)


# --------------------------------------------------------------------------------------------
# the CLI: one line on stderr, exit code 2, nothing started


def write_run(tmp_path, body: str):
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent(body))
    return path


@pytest.mark.parametrize(
    ("body", "sets", "field"),
    [
        ("method: {name: fixmatch}\ntrain: {stepz: 3}\n", [], "train.stepz"),
        ("method: {name: fixmatch}\n", ["train.steps=lots"], "train.steps"),
        ("method: {name: fixmatch}\n", ["method.name=mixmatch"], "method.name"),
        ("method: {name: fixmatch}\nmodel: {name: vgg}\n", [], "model.name"),
        ("method: {name: fixmatch}\ndata: {name: mnist}\n", [], "data.name"),
        ("method: {name: fixmatch}\ndata: {name: cifar10, root: /nonexistent/cifar}\n", [], "data.root"),
        ("method: {name: fixmatch}\n", ["scaling.use_gpu=true"], "scaling.use_gpu"),
        ("method: {name: fixmatch}\n", ["threshold=0.9"], "threshold"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, body, sets, field):
    path = write_run(tmp_path, body)
    argv = ["train", str(path), "--out", str(tmp_path / "out")]
    for s in sets:
        argv += ["--set", s]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"raykd: error: {field}:"), err
    assert not (tmp_path / "out").exists()


def test_cli_bad_input_starts_no_ray(tmp_path):
    """In a fresh interpreter: the error path never imports Ray (so it cannot start a cluster)."""
    path = write_run(tmp_path, "method: {name: fixmatch}\ntrain: {stepz: 3}\n")
    code = (
        "import sys; from raykd.cli import main; rc = main(['train', sys.argv[1]]); "
        "assert 'ray' not in sys.modules, 'ray was imported'; sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    allowed = ", ".join(TrainConfig.model_fields)
    assert proc.stderr.strip().splitlines() == [f"raykd: error: train.stepz: unknown key; allowed keys: {allowed}"]


_NO_HEAVY_IMPORT = """
import contextlib, io, json, sys
from raykd.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    out.append([rc, err.getvalue()])
heavy = sorted(m for m in ("torch", "torchvision", "ray", "optuna") if m in sys.modules)
print(json.dumps({"results": out, "heavy": heavy}))
"""

_TYPOS = [  # (command, file text, the field the one error line must name)
    (["train"], "method: {name: NAME, no_such_knob: 1}\n", "method.no_such_knob"),
    (["train"], "method: {name: NAME}\ntrain: {stepz: 3}\n", "train.stepz"),
    (["train"], "method: {name: NAME}\nmodel: {name: small_cnn, widht: 8}\n", "model.widht"),
    (["study", "run"], "name: s\nbase: {method: {name: NAME, no_such_knob: 1}}\n", "base.method.no_such_knob"),
    (["ablate"], "name: a\nbase: {method: {name: NAME, typo: 1}}\ngrid: {train.lr: [0.1]}\n", "base.method.typo"),
]


@pytest.mark.parametrize("method", sorted(METHODS.names()))
def test_a_typo_is_refused_without_importing_torch_or_ray(tmp_path, method):
    """Parsing and validation never import torch, torchvision, Ray or Optuna (so a typo is refused in
    well under a second; benchmarks/reject_time.py measures it), for every method and entry point."""
    argvs = []
    for i, (command, text, _) in enumerate(_TYPOS):
        path = tmp_path / f"c{i}.yaml"
        path.write_text(text.replace("NAME", method))
        argvs.append([*command, str(path)])
    proc = subprocess.run([sys.executable, "-c", _NO_HEAVY_IMPORT, json.dumps(argvs)], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for (rc, err), (_, _, field) in zip(report["results"], _TYPOS, strict=True):
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"raykd: error: {field}:"), (field, rc, lines)
    assert report["heavy"] == [], f"validation imported {report['heavy']}"
    assert not any(p.is_dir() for p in tmp_path.iterdir()), "something was written"


def test_cli_usage_errors_are_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train"])
    assert info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
