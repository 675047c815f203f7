"""Tests for raykd.report: ablation and study tables and plots, from synthetic trial records."""

from __future__ import annotations

import csv
import math
import warnings

import pytest

from raykd import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _rec(tid, state, params, **metrics):
    history = [{"step": 100, "epoch": 1, **metrics}] if metrics else []
    return {"trial_id": tid, "state": state, "params": params, "metrics": dict(metrics), "history": history}


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _assert_png(path):
    assert path.exists()
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 1000


def _table_rows(md: str) -> list[str]:
    """Markdown table lines without the separator line."""
    return [ln for ln in md.splitlines() if ln.startswith("|") and not ln.startswith("|---")]


def _ssl_metrics(test, best_val_test, mask, pseudo, val=0.9):
    return dict(
        step=400,
        test_acc=test,
        val_acc=val,
        best_val_acc=val,
        test_acc_at_best_val=best_val_test,
        mask_rate=mask,
        pseudo_acc=pseudo,
        loss=0.5,
    )


def _ablation_records_1d():
    k = "method.threshold"
    return [
        # listed out of numeric order on purpose
        _rec("t1", "done", {k: 0.95, "seed": 0}, **_ssl_metrics(0.8, 0.78, 0.5, 0.9)),
        _rec("t2", "done", {k: 0.95, "seed": 1}, **_ssl_metrics(0.9, 0.88, 0.7, 0.92)),
        _rec("t3", "done", {k: 0.7, "seed": 0}, **_ssl_metrics(0.6, 0.6, 0.9, 0.8)),
        _rec("t4", "done", {k: 0.7, "seed": 1}, **_ssl_metrics(0.7, 0.64, 0.9, 0.8)),
        # excluded from the aggregate: not done
        _rec("t5", "stopped", {k: 0.7, "seed": 2}, **_ssl_metrics(0.1, 0.1, 0.1, 0.1)),
        _rec("t6", "error", {k: 0.95, "seed": 2}, **_ssl_metrics(0.0, 0.0, 0.0, 0.0)),
    ]


def test_ablation_1d(tmp_path):
    paths = report.write_ablation_report(_ablation_records_1d(), ["method.threshold"], "test_acc", tmp_path)
    assert set(paths) == {"csv", "md", "png"}
    assert paths["csv"].name == "ablation.csv" and paths["md"].name == "ablation.md"
    rows = _read_csv(paths["csv"])
    assert [float(r["method.threshold"]) for r in rows] == [0.7, 0.95]
    assert [r["n"] for r in rows] == ["2", "2"]
    for col in ("test_acc", "test_acc_at_best_val", "best_val_acc", "val_acc", "mask_rate", "pseudo_acc"):
        assert f"{col}_mean" in rows[0] and f"{col}_std" in rows[0]
    assert "loss_mean" not in rows[0]
    assert list(rows[0]).count("test_acc_mean") == 1
    hi = rows[1]
    assert float(hi["test_acc_mean"]) == pytest.approx(0.85)
    assert float(hi["test_acc_std"]) == pytest.approx(math.sqrt(0.005))  # 0.0707...
    assert float(hi["mask_rate_mean"]) == pytest.approx(0.6)
    assert float(hi["test_acc_at_best_val_mean"]) == pytest.approx(0.83)
    lo = rows[0]
    assert float(lo["test_acc_mean"]) == pytest.approx(0.65)  # the stopped 0.1 is not averaged in
    assert float(lo["mask_rate_std"]) == pytest.approx(0.0)
    assert float(lo["test_acc_at_best_val_mean"]) == pytest.approx(0.62)

    _assert_png(paths["png"])
    md = paths["md"].read_text()
    table = _table_rows(md)
    assert len(table) == 3  # header + 2 cells
    assert "method.threshold" in table[0] and "test_acc_at_best_val" in table[0]
    assert "0.8500 ± 0.0707" in table[2]
    assert "0.6500 ± 0.0707" in table[1]
    assert "best validation accuracy" in md


def test_ablation_cell_without_done_seeds(tmp_path):
    k = "train.lr"
    records = [
        _rec("a", "done", {k: 0.03, "seed": 0}, test_acc=0.9),
        _rec("b", "error", {k: 0.3, "seed": 0}, test_acc=0.1),
        _rec("c", "done", {k: 0.003, "seed": 0}, test_acc=0.7),
    ]
    paths = report.write_ablation_report(records, [k], "test_acc", tmp_path)
    rows = _read_csv(paths["csv"])
    assert [r[k] for r in rows] == ["0.003", "0.03", "0.3"]
    assert [r["n"] for r in rows] == ["1", "1", "0"]
    assert rows[0]["test_acc_std"] == ""  # one seed: no spread to report
    assert rows[2]["test_acc_mean"] == "" and rows[2]["test_acc_std"] == ""
    _assert_png(paths["png"])  # log x axis (100x span), one empty cell


def test_ablation_2d(tmp_path):
    records = []
    for th in (0.95, 0.8):
        for lam in (2.0, 1.0):
            for seed in (0, 1):
                acc = th * 0.5 + lam * 0.1 + seed * 0.01
                records.append(
                    _rec(
                        f"{th}-{lam}-{seed}",
                        "done",
                        {"method.threshold": th, "method.lambda_u": lam, "seed": seed},
                        **_ssl_metrics(acc, acc - 0.01, 0.5, 0.9),
                    )
                )
    paths = report.write_ablation_report(records, ["method.threshold", "method.lambda_u"], "test_acc", tmp_path)
    rows = _read_csv(paths["csv"])
    assert len(rows) == 4
    assert list(rows[0])[:3] == ["method.threshold", "method.lambda_u", "n"]
    keys = [(float(r["method.threshold"]), float(r["method.lambda_u"])) for r in rows]
    assert keys == [(0.8, 1.0), (0.8, 2.0), (0.95, 1.0), (0.95, 2.0)]
    assert float(rows[3]["test_acc_mean"]) == pytest.approx(0.95 * 0.5 + 0.2 + 0.005)
    assert len(_table_rows(paths["md"].read_text())) == 5
    _assert_png(paths["png"])


@pytest.mark.parametrize("values", [("sce", "ce"), (True, False)])
def test_ablation_categorical(tmp_path, values):
    k = "method.loss"
    records = [
        _rec(f"{v}{s}", "done", {k: v, "seed": s}, test_acc=0.5 + 0.1 * i + 0.01 * s)
        for i, v in enumerate(values)
        for s in (0, 1)
    ]
    paths = report.write_ablation_report(records, [k], "test_acc", tmp_path)
    rows = _read_csv(paths["csv"])
    assert [r[k] for r in rows] == [str(v) for v in values]  # categorical: grid order kept
    assert float(rows[1]["test_acc_mean"]) == pytest.approx(0.605)
    _assert_png(paths["png"])


def test_ablation_missing_optional_metrics(tmp_path):
    """A supervised method reports no mask_rate / pseudo_acc, and there is no validation split."""
    k = "train.lr"
    records = [
        _rec(f"{lr}{s}", "done", {k: lr, "seed": s}, step=400, test_acc=0.5 + lr) for lr in (0.1, 0.01) for s in (0, 1)
    ]
    paths = report.write_ablation_report(records, [k], "test_acc", tmp_path)
    rows = _read_csv(paths["csv"])
    assert list(rows[0]) == [k, "n", "test_acc_mean", "test_acc_std"]
    assert "mask_rate" not in paths["md"].read_text().split("\n\n")[-1]
    _assert_png(paths["png"])


def test_ablation_metric_is_best_on_val_not_repeated(tmp_path):
    records = _ablation_records_1d()
    paths = report.write_ablation_report(records, ["method.threshold"], "test_acc_at_best_val", tmp_path)
    header = next(csv.reader(paths["csv"].open()))
    assert header.count("test_acc_at_best_val_mean") == 1
    assert header[2] == "test_acc_at_best_val_mean"


def test_ablation_rejects_three_knobs(tmp_path):
    with pytest.raises(ValueError):
        report.write_ablation_report([], ["a", "b", "c"], "test_acc", tmp_path)


def _study_records():
    return [
        _rec("a", "done", {"method.threshold": 0.9, "train.lr": 0.03}, step=400, test_acc=0.80, val_acc=0.78),
        _rec("b", "stopped", {"method.threshold": 0.7, "train.lr": 0.001}, step=100, test_acc=0.60, val_acc=0.55),
        _rec("c", "done", {"method.threshold": 0.95, "train.lr": 0.1}, step=400, test_acc=0.90, val_acc=0.88),
        {"trial_id": "d", "state": "pending", "params": {"method.threshold": 0.8, "train.lr": 0.01}, "metrics": {}},
    ]


def test_study_report(tmp_path):
    keys = ["method.threshold", "train.lr"]
    paths = report.write_study_report(_study_records(), keys, "test_acc", "max", tmp_path)
    assert set(paths) == {"csv", "md", "history", "metric_vs_method_threshold", "metric_vs_train_lr"}
    rows = _read_csv(paths["csv"])
    assert [r["trial_id"] for r in rows] == ["a", "b", "c", "d"]
    assert list(rows[0]) == ["trial_id", "state", *keys, "step", "test_acc", "val_acc"]
    assert rows[3]["test_acc"] == "" and rows[3]["state"] == "pending"
    assert rows[1]["step"] == "100"

    table = _table_rows(paths["md"].read_text())
    assert len(table) == 5
    data = [[c.strip() for c in ln.strip("|").split("|")] for ln in table[1:]]
    assert [r[1] for r in data] == ["c", "a", "b", "d"]  # best first, no metric last
    assert [r[0] for r in data] == ["*", "", "", ""]
    assert "0.9000" in table[1]

    for key in keys:
        _assert_png(paths[f"metric_vs_{key.replace('.', '_')}"])
    assert paths["metric_vs_train_lr"].name == "metric_vs_train_lr.png"
    _assert_png(paths["history"])


def test_study_report_min_mode(tmp_path):
    paths = report.write_study_report(_study_records(), ["method.threshold"], "test_acc", "min", tmp_path)
    data = [[c.strip() for c in ln.strip("|").split("|")] for ln in _table_rows(paths["md"].read_text())[1:]]
    # full-budget trials rank first in either mode (the one ranking export uses): a, c, then stopped b
    assert [r[1] for r in data] == ["a", "c", "b", "d"]
    assert data[0][0] == "*" and all(r[0] == "" for r in data[1:])
    assert report.best_index(_study_records(), "test_acc", "min") == 0
    assert report.best_index(_study_records(), "test_acc", "max") == 2


def test_study_report_categorical_and_no_metric(tmp_path):
    records = [
        _rec("a", "done", {"method.loss": "ce"}, test_acc=0.7),
        _rec("b", "running", {"method.loss": "sce"}, test_acc=0.75),
        _rec("c", "error", {"method.loss": "sce"}),
    ]
    paths = report.write_study_report(records, ["method.loss"], "test_acc", "max", tmp_path)
    _assert_png(paths["metric_vs_method_loss"])
    # no trial has the metric at all: still writes tables and (empty) plots
    paths = report.write_study_report(records, ["method.loss"], "val_acc", "max", tmp_path / "empty")
    assert "*" not in paths["md"].read_text().split("\n\n")[-1]
    _assert_png(paths["history"])


def _optuna_study(tmp_path, n_trials):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{tmp_path}/o.db"
    study = optuna.create_study(
        storage=storage, study_name="s", direction="maximize", sampler=optuna.samplers.TPESampler(seed=0)
    )
    study.optimize(lambda t: t.suggest_float("x", 0, 1) ** 2 + 0.01 * t.suggest_float("y", 0, 1), n_trials=n_trials)
    return storage


def test_importance(tmp_path):
    storage = _optuna_study(tmp_path, report.MIN_IMPORTANCE_TRIALS)
    imp = report.param_importances(storage, "s")
    assert imp is not None and set(imp) == {"x", "y"}
    assert imp["x"] > imp["y"]
    assert next(iter(imp)) == "x"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no experimental-feature warnings leak out
        paths = report.write_study_report(
            _study_records(), ["method.threshold"], "test_acc", "max", tmp_path / "r", storage, "s"
        )
    _assert_png(paths["importance"])
    md = paths["md"].read_text()
    assert f"fANOVA over {report.MIN_IMPORTANCE_TRIALS} completed trials" in md and "| `x` |" in md


def test_importance_skipped(tmp_path):
    storage = _optuna_study(tmp_path, 1)
    assert report.param_importances(storage, "s") is None
    paths = report.write_study_report(
        _study_records(), ["method.threshold"], "test_acc", "max", tmp_path / "r", storage, "s"
    )
    assert "importance" not in paths
    assert not (tmp_path / "r" / "importance.png").exists()
    # unknown study name, or no storage: skipped too
    assert report.param_importances(storage, "nope") is None
    paths = report.write_study_report(_study_records(), ["method.threshold"], "test_acc", "max", tmp_path / "r2")
    assert "importance" not in paths


def test_helpers():
    assert report.format_mean_std(0.85, 0.0707106) == "0.8500 ± 0.0707"
    assert report.format_mean_std(None, None) == ""
    assert report.ordered_values([10, 2, 2.0, 30]) == [2, 10, 30]
    assert report.ordered_values(["b", "a", "b"]) == ["b", "a"]
    assert report.ordered_values([True, 1, False]) == [True, 1, False]
    table = report.markdown_table(["a", "b"], [[1, "x|y"]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | x\\|y |"]


def test_paired_comparison_on_hand_made_seeds():
    ref = [0.60, 0.62, 0.58, 0.61, 0.59]
    up = [0.63, 0.64, 0.62, 0.63, 0.62]  # diffs 0.03 0.02 0.04 0.02 0.03
    c = report.paired_comparison(ref, up)
    assert c["n"] == 5 and c["wins"] == 5 and c["losses"] == 0
    assert c["mean"] == pytest.approx(0.028)
    # sd of the diffs = 0.008367; t(0.975, 4) = 2.776; half width = 2.776 * 0.008367 / sqrt(5) = 0.010388
    assert c["hi"] - c["mean"] == pytest.approx(0.010388, abs=1e-5)
    assert c["verdict"] == "holds"
    assert report.paired_comparison(up, ref)["verdict"] == "does not hold"
    mixed = report.paired_comparison(ref, [0.61, 0.61, 0.60, 0.60, 0.59])
    assert mixed["lo"] < 0 < mixed["hi"] and mixed["verdict"] == "inconclusive"
    assert report.paired_comparison([0.5], [0.6])["verdict"] == "inconclusive"
    assert report.format_paired(c) == "+0.0280 [+0.0176, +0.0384], 5/5 seeds up: holds"
    with pytest.raises(ValueError):
        report.paired_comparison([0.1, 0.2], [0.3])


class _Figures:
    """Captures every figure the report saves (axes scales, titles, texts) before it is closed."""

    def __init__(self, monkeypatch):
        self.saved: dict[str, list] = {}
        original = report._save

        def save(fig, path):
            self.saved[path.name] = [
                {"xscale": ax.get_xscale(), "title": ax.get_title(), "xlabel": ax.get_xlabel(),
                 "texts": [t.get_text() for t in ax.texts], "ticks": [t.get_text() for t in ax.get_xticklabels()]}
                for ax in fig.axes
            ]  # fmt: skip
            return original(fig, path)

        monkeypatch.setattr(report, "_save", save)


def test_study_plots_use_a_log_axis_for_log_scaled_knobs(tmp_path, monkeypatch):
    figs = _Figures(monkeypatch)
    keys = ["method.threshold", "train.lr"]
    # lr spans only 3x (the value heuristic alone would draw it linear), the threshold 1.4x
    records = [_rec(f"t{i}", "done", {"method.threshold": 0.65 + 0.03 * i, "train.lr": 0.01 * (1 + 0.25 * i)},
                    step=400, test_acc=0.5 + 0.04 * i) for i in range(9)]  # fmt: skip
    paths = report.write_study_report(records, keys, "test_acc", "max", tmp_path, log_keys={"train.lr"})
    assert figs.saved["metric_vs_train_lr.png"][0]["xscale"] == "log"
    assert figs.saved["metric_vs_train_lr.png"][0]["xlabel"] == "train.lr (log scale)"
    assert figs.saved["metric_vs_method_threshold.png"][0]["xscale"] == "linear"
    _assert_png(paths["metric_vs_train_lr"])
    # a uniform knob is drawn linear even when its values span 100x; without log_keys the values decide
    wide = [_rec(f"w{i}", "done", {"method.k": 10.0**i}, test_acc=0.5) for i in range(3)]
    report.write_study_report(wide, ["method.k"], "test_acc", "max", tmp_path / "a", log_keys=set())
    assert figs.saved["metric_vs_method_k.png"][0]["xscale"] == "linear"
    report.write_study_report(wide, ["method.k"], "test_acc", "max", tmp_path / "b")
    assert figs.saved["metric_vs_method_k.png"][0]["xscale"] == "log"


def test_no_importance_plot_from_too_few_trials_and_study_md_says_why(tmp_path):
    few = report.MIN_IMPORTANCE_TRIALS - 1
    storage = _optuna_study(tmp_path, few)
    assert report.param_importances(storage, "s") is None
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "importance.png").write_bytes(b"stale")  # from an earlier report
    paths = report.write_study_report(_study_records(), ["method.threshold"], "test_acc", "max", tmp_path / "r",
                                      storage, "s")  # fmt: skip
    assert "importance" not in paths and not (tmp_path / "r" / "importance.png").exists()
    md = paths["md"].read_text()
    assert (f"No importance plot: {few} completed trial(s); importances need at least "
            f"{report.MIN_IMPORTANCE_TRIALS}") in md  # fmt: skip
    imp, why = report.importance_or_reason(storage, "s", min_trials=2)
    assert imp is not None and why == f"fANOVA over {few} completed trials"
    assert report.importance_or_reason(storage, "nope")[1].startswith("the Optuna study 'nope' could not be loaded")


def test_ablation_with_one_seed_shows_n_and_no_spread(tmp_path, monkeypatch):
    figs = _Figures(monkeypatch)
    k = "train.lr"
    records = [_rec(f"a{lr}", "done", {k: lr, "seed": 0}, **_ssl_metrics(0.5 + lr, 0.5, 0.9, 0.8))
               for lr in (0.01, 0.03, 0.1)]  # fmt: skip
    paths = report.write_ablation_report(records, [k], "test_acc", tmp_path, log_keys={k})
    rows = _read_csv(paths["csv"])
    assert [r["n"] for r in rows] == ["1", "1", "1"] and all(r["test_acc_std"] == "" for r in rows)
    table = _table_rows(paths["md"].read_text())
    assert "±" not in "".join(table) and "0.5100 (n=1)" in table[1]
    (fig,) = figs.saved["ablation.png"]
    assert fig["ticks"] == ["0.01\nn=1", "0.03\nn=1", "0.1\nn=1"] and "one seed: no error bars" in fig["title"]
    assert fig["xscale"] == "log"  # declared log-scaled, though the grid spans only 10x


def test_ablation_names_the_seed_count_of_each_point(tmp_path, monkeypatch):
    figs = _Figures(monkeypatch)
    k = "method.threshold"
    records = [_rec(f"{th}{s}", "done", {k: th, "seed": s}, test_acc=0.6 + 0.01 * s) for th, n in ((0.7, 3), (0.9, 2))
               for s in range(n)]  # fmt: skip
    records.append(_rec("x", "done", {k: 0.9, "seed": 2}, step=400))  # finished, but without the metric
    paths = report.write_ablation_report(records, [k], "test_acc", tmp_path)
    table = _table_rows(paths["md"].read_text())
    assert "0.6100 ± 0.0100 |" in table[1]  # 3 of 3 seeds: the n column says it
    assert "0.6050 ± 0.0071 (n=2)" in table[2]  # 2 of the cell's 3 seeds reported it
    (fig,) = figs.saved["ablation.png"]
    assert fig["ticks"] == ["0.7\nn=3", "0.9\nn=2"] and "mean ± std over n seeds" in fig["title"]
    # a 2-D grid: the n of each point beside it (the lines at one x may differ)
    records = [_rec(f"{th}{lam}{s}", "done", {k: th, "method.lambda_u": lam, "seed": s}, test_acc=0.6)
               for th in (0.7, 0.9) for lam in (1.0, 2.0) for s in range(1 if lam == 2.0 else 2)]  # fmt: skip
    report.write_ablation_report(records, [k, "method.lambda_u"], "test_acc", tmp_path / "2d")
    (fig,) = figs.saved["ablation.png"]
    assert sorted(fig["texts"]) == ["n=1", "n=1", "n=2", "n=2"]
    assert report.format_mean_std(0.85, None, n=1) == "0.8500 (n=1)"


def test_ablation_cells_are_paired_by_seed_against_the_reference(tmp_path):
    k = "method.threshold"
    ref = [0.60, 0.62, 0.58, 0.61, 0.59]
    up = [0.63, 0.66, 0.60, 0.65, 0.62]  # +0.03, +0.04, +0.02, +0.04, +0.03 on the same seeds
    recs = [_rec(f"r{s}", "done", {k: 0.95, "seed": s}, test_acc=v) for s, v in enumerate(ref)]
    recs += [_rec(f"u{s}", "done", {k: 0.8, "seed": s}, test_acc=v) for s, v in enumerate(up)]
    # a cell whose only finished seed the reference lacks: nothing to pair
    recs += [_rec("x", "done", {k: 0.7, "seed": 9}, test_acc=0.5), _rec("y", "error", {k: 0.7, "seed": 0})]
    cells = report.paired_cells(recs, [k], "test_acc", [0.95])
    assert [c["values"] for c in cells] == [(0.7,), (0.8,)]  # every cell but the reference, in grid order
    assert cells[0]["comparison"] is None
    c = cells[1]["comparison"]
    assert c["n"] == 5 and c["diffs"] == pytest.approx([0.03, 0.04, 0.02, 0.04, 0.03])
    assert c["mean"] == pytest.approx(0.032)
    # 0.032 ± t(0.975, 4) · 0.008367 / √5 = 0.032 ± 2.776445 · 0.003742
    assert (c["lo"], c["hi"]) == pytest.approx((0.032 - 0.010388, 0.032 + 0.010388), abs=1e-5)
    assert (c["wins"], c["verdict"]) == (5, "holds")
    paths = report.write_ablation_report(recs, [k], "test_acc", tmp_path, reference=[0.95])
    rows = {r[k]: r for r in _read_csv(paths["csv"])}
    assert rows["0.95"]["vs_ref_n"] == "reference" and rows["0.7"]["vs_ref_n"] == ""
    assert float(rows["0.8"]["vs_ref_mean"]) == pytest.approx(0.032) and rows["0.8"]["vs_ref_verdict"] == "holds"
    md = paths["md"].read_text()
    assert "## Paired against method.threshold = 0.95" in md
    assert "+0.0320 [+0.0216, +0.0424], 5/5 seeds up: holds" in md and "no seed finished in both" in md
