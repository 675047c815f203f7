"""``raykd methods``: the listing and one method in full, as a user reads them (100 columns, YAML
spellings, what each method needs, the searchable knobs)."""

from __future__ import annotations

import re

import pytest
import yaml

from raykd import catalog
from raykd.cli import main
from raykd.config import TrainConfig, search_range
from raykd.registry import METHODS

PYTHON_SPELLINGS = re.compile(r"\b(True|False|None)\b")


def _run(capsys, *args) -> tuple[int, str, str]:
    rc = main(["methods", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _check_lines(text: str) -> None:
    lines = text.splitlines()
    too_wide = [ln for ln in lines if len(ln) > catalog.WIDTH]
    assert not too_wide, too_wide
    assert not [ln for ln in lines if PYTHON_SPELLINGS.search(ln)], "Python spellings where users type YAML"


def test_listing_fits_100_columns_in_yaml_and_names_every_method(capsys):
    rc, out, _ = _run(capsys)
    assert rc == 0
    _check_lines(out)
    for name in METHODS.names():
        method = METHODS.get(name)
        assert f"\n{name}: " in out
        # the summary is whole, not cut mid-sentence
        assert catalog.summary(method).split()[-1] in out
    # the method line is a YAML mapping of the defaults that parses back
    block = out.split("\nfixmatch: ", 1)[1].split("\n\n", 1)[0]
    mapping = re.search(r"method: (\{.*?\})\n  search", block, re.S).group(1)
    assert yaml.safe_load(mapping) == {"name": "fixmatch", "threshold": 0.95, "lambda_u": 1.0, "hard_label": True,
                                       "temperature": 0.5}  # fmt: skip
    # what each method needs
    kd = out.split("\nkd: ", 1)[1].split("\n\n", 1)[0]
    assert "teacher: required" in kd
    slam = out.split("\nslam: ", 1)[1].split("\n\n", 1)[0]
    assert "validation split: required" in " ".join(slam.split())
    sup = out.split("\nsupervised: ", 1)[1].split("\n\n", 1)[0]
    assert "teacher: none" in sup and "unlabeled data: not used" in sup
    # the searchable train knobs are discoverable
    tail = out.split("train knobs every study can search", 1)[1]
    for k in TrainConfig.model_fields:
        if search_range(TrainConfig, k) is not None:
            assert f"train.{k}: " in tail
    assert "train.lr: float = 0.03, > 0; search {loguniform: [0.005, 0.1]}" in tail


@pytest.mark.parametrize("name", METHODS.names())
def test_one_method_in_full(capsys, name):
    rc, out, _ = _run(capsys, name)
    assert rc == 0
    _check_lines(out)
    method = METHODS.get(name)
    flat = " ".join(out.split())
    assert " ".join(catalog.summary(method).split()) in flat  # the whole description
    for k, field in catalog.knobs(method.Config).items():
        assert f"method.{k}: {catalog.type_name(field.annotation)} = " in out
        if field.description:
            assert " ".join(field.description.split()) in flat
        rng = search_range(method.Config, k)
        if rng is not None:
            assert f"method.{k}: " in out and catalog.yaml_value(rng) in flat
    assert "train.lr: float = 0.03" in out
    needs_teacher = "teacher: required" in out
    assert needs_teacher == method.Config.needs_teacher


def test_yaml_spellings_of_one_method(capsys):
    _, out, _ = _run(capsys, "kd_fixmatch")
    assert "method.num_clusters: int or null = null, >= 1; not searchable by default" in out
    assert "method.loss_u: choice = ce, one of: ce, sce; search {choice: [ce, sce]}" in out
    assert "method.threshold: float = 0.95, in [0.0, 1.0]; search {uniform: [0.8, 0.99]}" in out
    _, out, _ = _run(capsys, "fixmatch")
    assert "method.hard_label: bool = true" in out and "{choice: [true, false]}" in out
    _, out, _ = _run(capsys, "supervised")
    assert "(none)" in out and "train.uratio" not in out  # supervised draws no unlabeled batch


def test_unknown_method_is_one_line_and_exit_2(capsys):
    rc, out, err = _run(capsys, "fixmach")
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert "fixmach" in err and all(name in err for name in METHODS.names())


def test_yaml_value():
    assert catalog.yaml_value(True) == "true" and catalog.yaml_value(None) == "null"
    assert catalog.yaml_value([0.7, 0.99]) == "[0.7, 0.99]"
    assert catalog.yaml_value({"uniform": [0.7, 0.99]}) == "{uniform: [0.7, 0.99]}"
    assert catalog.yaml_value(5e-4) == "0.0005" and catalog.yaml_value("ce") == "ce"
