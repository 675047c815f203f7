"""The README held against the code: its run-config block shows the real defaults, and its method
table lists exactly the registered methods."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from raykd.config import DataConfig, ModelConfig, ScalingConfig, TrainConfig
from raykd.registry import METHODS

README = Path(__file__).resolve().parents[1] / "README.md"
#: a line of the run-config block whose comment starts with this shows an example, not a default
EXAMPLE = "# example"


def run_config_block() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## The run config", 1)[1]
    return re.search(r"```yaml\n(.*?)```", section, re.S).group(1)


def defaults() -> dict[str, dict]:
    method = METHODS.get("fixmatch").Config(name="fixmatch")
    return {
        "data": DataConfig().model_dump(mode="json"),
        "model": ModelConfig().model_dump(mode="json"),
        "method": method.model_dump(mode="json"),
        "train": TrainConfig().model_dump(mode="json"),
        "scaling": ScalingConfig().model_dump(mode="json"),
    }


def test_run_config_block_shows_the_defaults():
    block = run_config_block()
    exempt = {ln.split(":", 1)[0] for ln in block.splitlines() if f" {EXAMPLE}" in ln and not ln.startswith(" ")}
    shown = yaml.safe_load(block)
    code = defaults()
    checked = 0
    for section, values in shown.items():
        if section in exempt:
            continue
        assert section in code, f"README run config shows an unknown section {section!r}"
        for key, value in values.items():
            assert key in code[section], f"README shows {section}.{key}, which the code does not have"
            assert value == code[section][key], (f"README shows {section}.{key}: {value!r}, the code's default is "
                                                 f"{code[section][key]!r}")  # fmt: skip
            checked += 1
    assert checked >= 25 and exempt == {"teacher"}


def test_method_table_lists_exactly_the_registered_methods():
    text = README.read_text(encoding="utf-8")
    table = text.split("| method | what it does |", 1)[1].split("\n\n", 1)[0]
    rows = [ln.strip() for ln in table.splitlines() if ln.strip().startswith("| `")]
    names = [re.match(r"\| `([^`]+)`", row).group(1) for row in rows]
    assert sorted(names) == METHODS.names() and len(names) == len(set(names))
