"""Cloud storage (``--storage s3://…``): the driver's working copy of the trial folders.

Trials run on any node and write their run folders in node-local scratch, so the driver rebuilds each
trial folder in its working copy ``runs/<name>/`` from the results Tune hands it and copies the
working copy to the bucket after every finished trial and at the end.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ray.tune import Callback

from raykd.config import RunConfig
from raykd.train.runfolder import RunFolder
from raykd.tune.records import MIRRORED_STATES, TRIALS_DIR
from raykd.tune.space import with_params
from raykd.tune.storage import upload

#: study name -> working copy, set by the driver that runs or resumes it (a restored tuner's mirror
#: was pickled with the folder of the machine that started the study)
_WORKING_COPY: dict[str, Path] = {}
#: Tune's own result keys, left out of the rebuilt progress lines
_TUNE_KEYS = {"trial_id", "done", "experiment_tag", "checkpoint_path", "should_checkpoint", "training_iteration"}


class TrialMirror(Callback):
    """Cloud storage: trials run on any node and write their run folders there, so the driver rebuilds
    each trial folder (``config.yaml``, ``progress.jsonl``, ``result.json``) in its working copy from
    the results Tune hands it, and copies the working copy to ``remote`` after every finished trial
    and at the end of the experiment."""

    def __init__(self, study_dir: Path, remote: str, base: RunConfig, keys: list[str]):
        self.study_dir, self.remote, self.keys = study_dir.resolve(), remote, keys
        self.raw, self.steps = base.model_dump(mode="json"), base.train.steps
        self._last_step: dict[str, int] = {}

    def _root(self) -> Path:
        return _WORKING_COPY.get(self.study_dir.name, self.study_dir)

    def _dir(self, trial) -> Path:
        d = self._root() / TRIALS_DIR / trial.trial_id
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _set_state(self, trial, status: str) -> None:
        path = self._root() / MIRRORED_STATES
        try:
            states = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError):
            states = {}
        states[trial.trial_id] = status
        path.with_suffix(".tmp").write_text(json.dumps(states, indent=1))
        path.with_suffix(".tmp").replace(path)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._set_state(trial, "RUNNING")
        d = self._dir(trial)
        if not RunFolder(d).config_path.exists():
            params = {k: trial.config[k] for k in self.keys}
            RunFolder(d).write_config(with_params(self.raw, params))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        from ray.tune.result import AUTO_RESULT_KEYS

        run = RunFolder(self._dir(trial))
        step = result.get("step")
        if trial.trial_id not in self._last_step:
            history = run.progress()
            self._last_step[trial.trial_id] = history[-1].get("step", -1) if history else -1
        if not isinstance(step, int) or step <= self._last_step.get(trial.trial_id, -1):
            return  # a restarted trial re-reporting a step already recorded
        self._last_step[trial.trial_id] = step
        skip = set(AUTO_RESULT_KEYS) | _TUNE_KEYS
        record = {k: v for k, v in result.items() if k not in skip and isinstance(v, (int, float, str, bool))}
        run.append_progress(record)
        if step == self.steps:
            run.write_result(record)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._set_state(trial, "TERMINATED")
        self.sync()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._set_state(trial, "ERROR")
        self.sync()

    def on_experiment_end(self, trials, **info):
        self.sync()

    def sync(self) -> None:
        try:
            upload(_WORKING_COPY.get(self.study_dir.name, self.study_dir), self.remote)
        except Exception as e:  # noqa: BLE001 - the next sync retries; a study must not die of a failed copy
            print(f"warning: could not copy the study folder to {self.remote} ({e})", file=sys.stderr, flush=True)


