"""``train.compile: true``: the student's training forward through ``torch.compile``.

* the compiled step gives the eager step's loss on the same batch (tolerance: relative 1e-4,
  absolute 1e-5 — inductor fuses and reorders the float32 reductions, so the two differ in the last
  bits; measured here: relative 1.1e-7 on the loss, 6e-8 on the weights), and the weights after
  the step agree as closely;
* the graph is compiled once per worker: over several steps the TorchDynamo counters show no
  further frames compiled after the first step;
* checkpoints hold the plain module's state (no ``_orig_mod.`` keys) and load into an eager run;
* where torch.compile cannot run (no C++ compiler on CPU, no Triton on GPU), the run stops with one
  ``train.compile`` config error, before Ray starts for ``raykd train``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from raykd.cli import main
from raykd.errors import ConfigError
from raykd.testing import tiny_run_config
from raykd.train import loop
from raykd.train.context import LocalSession
from raykd.train.sampler import GlobalBatchSampler

UNAVAILABLE = loop.compile_unavailable(torch.device("cpu"))
needs_compile = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"torch.compile unavailable: {UNAVAILABLE}")
RTOL, ATOL = 1e-4, 1e-5
QUICKSTART = Path(__file__).resolve().parents[1] / "studies" / "quickstart_run.yaml"


def _run(compile: bool, tmp_path, steps: int = 6):
    cfg = tiny_run_config("fixmatch", method={"threshold": 0.105}, train={"steps": steps, "eval_every": steps,
                                                                         "compile": compile})  # fmt: skip
    run = loop.build_run(cfg, LocalSession(tmp_path / f"c{int(compile)}"), None)
    t = cfg.train
    lab = GlobalBatchSampler(len(run.ctx.data.labeled), t.batch_size, 0, 1, seed=0)
    unl = GlobalBatchSampler(len(run.ctx.data.unlabeled), t.batch_size * t.uratio, 0, 1, seed=1)
    run.model.train()
    return run, lambda step: loop._batch(run, step, lab, unl)


@needs_compile
def test_compiled_step_matches_eager_and_compiles_once(tmp_path):
    torch._dynamo.reset()
    counters.clear()
    eager, eager_batch = _run(False, tmp_path)
    compiled, compiled_batch = _run(True, tmp_path)
    assert isinstance(compiled.model, torch._dynamo.eval_frame.OptimizedModule)
    assert compiled.raw is compiled.ctx.raw_model and not isinstance(compiled.raw, type(compiled.model))

    loss_e, logs_e = loop.train_one_step(eager, eager_batch(0))
    loss_c, logs_c = loop.train_one_step(compiled, compiled_batch(0))
    torch.testing.assert_close(loss_c, loss_e, rtol=RTOL, atol=ATOL)
    for key in ("loss_x", "loss_u", "mask_rate"):
        torch.testing.assert_close(logs_c[key], logs_e[key], rtol=RTOL, atol=ATOL)
    for p_c, p_e in zip(compiled.raw.parameters(), eager.raw.parameters(), strict=True):
        torch.testing.assert_close(p_c, p_e, rtol=RTOL, atol=ATOL)

    after_first = dict(counters["frames"]), dict(counters["stats"])
    assert after_first[0].get("ok", 0) >= 1  # something was compiled at the first step
    for step in range(1, 6):
        loop.train_one_step(compiled, compiled_batch(step))
    assert dict(counters["frames"]) == after_first[0], "frames were compiled again after the first step"
    assert dict(counters["stats"]).get("unique_graphs") == after_first[1].get("unique_graphs")
    assert not counters["recompiles"]


@needs_compile
def test_checkpoints_of_a_compiled_run_hold_the_plain_module(tmp_path):
    torch._dynamo.reset()
    compiled, batch = _run(True, tmp_path)
    loop.train_one_step(compiled, batch(0))
    state = loop.checkpoint_state(compiled, 1)
    eager, _ = _run(False, tmp_path)
    assert list(state["model"]) == list(eager.raw.state_dict())
    assert not any("_orig_mod" in k for k in [*state["model"], *state["ema"]["module"]])
    eager.raw.load_state_dict(state["model"])  # strict: same keys, same shapes


def test_unavailable_compile_is_a_config_error(tmp_path, monkeypatch):
    from torch._inductor import cpp_builder

    def no_compiler():
        raise RuntimeError("no working C++ compiler found")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    assert "no C++ compiler" in loop.compile_unavailable(torch.device("cpu"))
    with pytest.raises(ConfigError) as err:
        _run(True, tmp_path)
    assert err.value.field == "train.compile"
    assert "set train.compile: false" in str(err.value)


def test_raykd_train_refuses_compile_before_ray_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loop, "compile_unavailable", lambda device: "no C++ compiler (test)")
    rc = main(["train", str(QUICKSTART), "--out", str(tmp_path / "run"), "--set", "train.compile=true"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "train.compile" in err and "no C++ compiler (test)" in err
