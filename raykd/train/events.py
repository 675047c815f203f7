"""TensorBoard event files keyed by the training step.

Rank 0 of every run (``raykd train``, a study trial, an ablation cell) writes the metrics of each
evaluation into ``<run folder>/tb/`` with the global training step as x, so the curves of runs and
trials line up whatever Tune's iteration counter says.  Tags are grouped as ``train/<name>`` (the
loss and the method's logs averaged over the log window, ``lr``, ``img_per_s``) and ``eval/<name>``
(``test_acc``, ``val_acc``, the best-so-far figures and the heads' ``test_<head>_acc``).  Non-finite
values (a ``pseudo_acc`` with no pseudo-label above the threshold, a diverged loss) are left out;
``progress.jsonl`` keeps them.

A restart from a checkpoint at step S opens a new event file whose first record tells TensorBoard
to drop what earlier files hold after step S (``purge_step`` S + 1), so the evaluations the run
writes again are shown once.  :func:`read_scalars` reads the files back without TensorBoard installed
(the TFRecord framing, with tensorboardX's ``Event`` protobuf) and applies the same rule.
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path
from typing import Any

from raykd.train.runfolder import TB_DIR

#: metrics that are not curves (counters and constants)
NOT_PLOTTED = ("step", "epoch", "time", "global_batch", "global_ubatch", "world_size")


#: metric prefixes of evaluations (``test_acc``, ``val_acc``, ``best_val_acc``, ``test_<head>_acc``, ...)
EVAL_PREFIXES = ("test_", "val_", "best_")


def tag_of(key: str) -> str:
    """The TensorBoard tag of a metric: evaluations under ``eval/``, the rest under ``train/``."""
    return f"eval/{key}" if key.startswith(EVAL_PREFIXES) else f"train/{key}"


class StepEvents:
    """The event writer of one run's rank 0 (``<run_dir>/tb/``), opened at the run's first step.

    Args:
        run_dir: the run folder.
        start: the step the run (re)starts from (its checkpoint's); events that earlier files hold
            after it are purged (hidden by TensorBoard).
    """

    def __init__(self, run_dir: str | Path, start: int = 0):
        from tensorboardX import SummaryWriter

        self.path = Path(run_dir) / TB_DIR
        self.path.mkdir(parents=True, exist_ok=True)
        restarted = start > 0 or any(self.path.glob("events.out.tfevents.*"))
        # one file per (re)start; the start step, then the pid, keep two starts within one second apart
        self._writer = SummaryWriter(str(self.path), purge_step=start + 1 if restarted else None, flush_secs=30,
                                     filename_suffix=f".{start:09d}.{os.getpid()}")  # fmt: skip

    def write(self, metrics: dict[str, Any]) -> None:
        """One evaluation's numeric metrics at ``metrics["step"]``, flushed to disk."""
        step = int(metrics["step"])
        for key, value in metrics.items():
            if key in NOT_PLOTTED or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if not math.isfinite(value):  # e.g. pseudo_acc with nothing above the threshold: no point
                continue
            self._writer.add_scalar(tag_of(key), float(value), global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def _records(path: Path):
    """The payloads of a TFRecord file (length, its CRC, data, its CRC); a cut-short tail ends it."""
    data = path.read_bytes()
    pos = 0
    while pos + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[pos : pos + 8])
        end = pos + 12 + length
        if end + 4 > len(data):
            return
        yield data[pos + 12 : end]
        pos = end + 4


def read_scalars(tb_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files in ``tb_dir``, as TensorBoard shows them: ``{tag: [(step,
    value), ...]}`` in step order, files read oldest first, and a file that starts with a purge
    (a restart) drops the earlier points at or after its step."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, dict[int, float]] = {}
    for path in sorted(Path(tb_dir).glob("events.out.tfevents.*")):
        for payload in _records(path):
            event = Event()
            event.ParseFromString(payload)
            if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                for points in out.values():
                    for step in [s for s in points if s >= event.step]:
                        del points[step]
            if event.HasField("summary"):
                for value in event.summary.value:
                    if value.HasField("simple_value"):
                        out.setdefault(value.tag, {})[int(event.step)] = float(value.simple_value)
    return {tag: sorted(points.items()) for tag, points in out.items() if points}
