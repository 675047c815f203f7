"""Every YAML shipped in studies/ is a valid run, study or ablation config (data folders aside)."""

from __future__ import annotations

from pathlib import Path

import pytest

from raykd.config import RunConfig, parse_config, read_yaml
from raykd.tune.ablation import check_key
from raykd.tune.config import AblationConfig, StudyConfig
from raykd.tune.space import check_metric, resolve_search, with_params

STUDIES = sorted((Path(__file__).resolve().parents[1] / "studies").glob("*.yaml"))


def test_the_quickstart_files_exist():
    names = {p.name for p in STUDIES}
    assert {"quickstart.yaml", "quickstart_run.yaml", "fixmatch_threshold_ablation.yaml"} <= names


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_shipped_config_is_valid(path):
    raw = read_yaml(path)
    if "search" in raw:
        study = parse_config(raw, StudyConfig)
        assert resolve_search(study)
        check_metric(study.base, study.tune.metric)
    elif "grid" in raw:
        abl = parse_config(raw, AblationConfig)
        for key, values in abl.grid.items():
            check_key(abl.base, key, field=f"grid.{key}")
            for v in values:
                with_params(abl.base, {key: v})
        check_metric(abl.base, abl.metric, field="metric")
        # the paired comparison against the reference cell is read from a 95 % interval: 5 seeds or more
        assert len(abl.seeds) >= 5, f"{path.name}: {len(abl.seeds)} seeds per cell; ship 5 or more"
    else:
        assert isinstance(parse_config(raw, RunConfig), RunConfig)
