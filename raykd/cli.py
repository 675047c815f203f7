"""The ``raykd`` command line.

Exit codes: 0 success, 2 bad input (one line on stderr naming the field and the fix; nothing is
started), 1 anything else.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from raykd.config import parse_config, read_yaml
from raykd.errors import ConfigError, raykd_command


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line (and still exit 2), pointing at the subcommand's help;
    descriptions and examples are printed as written."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"raykd: error: {message} (see `{self.prog} --help`)\n")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not 1 or more")
    return value


# --------------------------------------------------------------------------------------------
# raykd train


def resolve_run_dir(config_path: str, out: str | None, resolved: dict[str, Any]) -> tuple[Path, bool]:
    """Pick the run folder; returns ``(run_dir, resuming)``.

    An explicit ``--out`` must be new, or hold an unfinished run of the same config (then it resumes).
    Without ``--out`` the folder is ``runs/<config stem>`` (``runs/<study>-<stem>`` for a config that
    ``raykd study export`` wrote), resumed when unfinished with the same config, else the first free
    ``runs/<stem>-N``.
    """
    from raykd.train.runfolder import RunFolder

    def state(d: Path) -> tuple[str, str | None]:
        return RunFolder(d).status(resolved)

    if out is not None:
        d = Path(out)
        kind, diff = state(d)
        if kind == "finished":
            raise ConfigError("--out", f"{d} already holds a finished run (result.json); choose another --out")
        if kind == "failed":
            raise ConfigError("--out", f"{d} holds a run that diverged ({diff}); choose another --out (or delete "
                              f"{d}/failed.json to continue it from its last checkpoint)")  # fmt: skip
        if kind == "different":
            raise ConfigError("--out", f"{d} holds a different run ({diff}); choose another --out to keep both")
        return d, kind == "resume"
    stem = Path(config_path).stem
    study = (resolved.get("provenance") or {}).get("study")
    if study and not stem.startswith(str(study)):
        stem = f"{study}-{stem}"  # runs/<study>-best, not one runs/best for every study's best.yaml
    for n in range(1, 10_000):
        d = Path("runs") / (stem if n == 1 else f"{stem}-{n}")
        kind, _ = state(d)
        if kind in ("new", "resume"):
            return d, kind == "resume"
    raise ConfigError("--out", "no free run folder under runs/; pass --out")


def cmd_train(args: argparse.Namespace) -> int:
    import yaml

    from raykd.config import dump_run_config, load_run_config

    cfg = load_run_config(args.config, args.set)
    from raykd.train.preflight import preflight
    from raykd.train.teacher import prepare_teacher

    preflight(cfg, args.address)  # data, model, teacher checkpoint, GPU, compile: before Ray and before any file
    text = dump_run_config(cfg)
    run_dir, resuming = resolve_run_dir(args.config, args.out, yaml.safe_load(text))
    from raykd.train.runfolder import RunFolder

    folder = RunFolder(run_dir)
    folder.write_config(cfg)

    from raykd.errors import DivergedError
    from raykd.train.trainer import run_training

    t, s, d = cfg.train, cfg.scaling, cfg.data
    views = f"{t.batch_size} + {t.uratio}x{t.batch_size}" if t.uratio else f"{t.batch_size}"
    where = f"{s.num_workers} {'GPU' if s.use_gpu else 'CPU'} worker(s), {'nccl' if s.use_gpu else 'gloo'}"
    print(
        f"raykd train: {cfg.method.name} on {d.name} ({d.labels_per_class or 'all'} labels/class), "
        f"{cfg.model.name}, {t.steps} steps, global batch {views}, {where}",
        flush=True,
    )
    resume_note = ""
    if resuming:
        last = folder.last_step() if folder.state_files() else None
        resume_note = (f" (resuming from its latest intact checkpoint; last evaluation recorded: step {last})"
                       if last is not None
                       else " (no checkpoint was saved yet: starting from step 0)")  # fmt: skip
    print(
        f"  run folder: {run_dir}{resume_note}; evaluating the {'EMA' if t.ema > 0 else 'raw'} model "
        f"every {t.eval_every} steps",
        flush=True,
    )
    again = f"{raykd_command()} train {args.config} --out {run_dir}"
    address = args.address or os.environ.get("RAY_ADDRESS")
    print(f"  {'joining the Ray cluster at ' + address if address else 'starting a private local Ray'}; the first "
          "progress line follows the first evaluation", flush=True)  # fmt: skip
    try:
        teacher_dir = prepare_teacher(cfg, run_dir.parent, args.address)
        result = run_training(cfg, run_dir, address=args.address, verbose=args.verbose, teacher_dir=teacher_dir)
    except KeyboardInterrupt:
        print(f"\ninterrupted; resume with: {again}", file=sys.stderr)
        return 130
    except DivergedError as e:
        print(f"raykd: {e}; lower train.lr (now {t.lr:g}) or check the data and the method's knobs, and train into "
              "another --out", file=sys.stderr)  # fmt: skip
        return 1
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - one line and the way back in; the traceback with --verbose
        if args.verbose:
            raise
        msg = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        print(f"raykd: the run failed: {type(e).__name__}: {msg} (rerun with --verbose for details)\n"
              f"  its checkpoints are kept; resume with: {again}", file=sys.stderr)  # fmt: skip
        return 1
    acc = f"test_acc {result.get('test_acc', float('nan')):.4f}"
    if "val_acc" in result:
        acc += f", val_acc {result['val_acc']:.4f}"
    print(
        f"done: {acc} at step {result.get('step')} in {result['wall_s']:.0f} s; results in {run_dir / 'result.json'}",
        flush=True,
    )
    return 0


# --------------------------------------------------------------------------------------------
# raykd methods


def cmd_methods(args: argparse.Namespace) -> int:
    from raykd import catalog

    print(catalog.describe(args.name) if args.name else catalog.listing())
    return 0


# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# raykd study / ablate / report


def _folder(path: str) -> Path:
    d = Path(path)
    if not d.is_dir():
        raise ConfigError(path, "no such folder; pass a study or ablation folder such as runs/<name>")
    return d


def _study_folder(path: str) -> Path:
    from raykd.tune.records import STUDY_FILE

    d = _folder(path)
    if not (d / STUDY_FILE).exists():
        raise ConfigError(path, f"not a study folder (no {STUDY_FILE}); pass the folder `raykd study run` created")
    return d


def cmd_study_run(args: argparse.Namespace) -> int:
    from raykd.tune.config import parse_study_file

    cfg = parse_study_file(args.config, name=args.name, storage=args.storage)  # typos refused before torch and Ray load
    from raykd.tune import study

    return study.run(cfg, study.check_study(cfg, address=args.address), address=args.address)


def cmd_study_resume(args: argparse.Namespace) -> int:
    from raykd.tune import study

    return study.resume(_folder(args.dir), address=args.address)


def cmd_study_status(args: argparse.Namespace) -> int:
    from raykd.tune import study

    print(study.status_text(_study_folder(args.dir)))
    return 0


def cmd_study_export(args: argparse.Namespace) -> int:
    from raykd.tune import study

    if args.pareto:
        paths = study.export_pareto(_study_folder(args.dir), Path(args.out), force=args.force)
    else:
        paths = study.export(_study_folder(args.dir), Path(args.out), top_k=args.top_k, force=args.force)
    for path in paths:
        print(f"wrote {path}  (re-run: {raykd_command()} train {path})")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from raykd.tune.config import parse_ablation_file

    abl = parse_ablation_file(args.config, storage=args.storage)  # typos refused before torch and Ray load
    from raykd.tune import ablation

    ablation.check_ablation(abl, address=args.address)
    return ablation.run(abl, address=args.address)


def cmd_report(args: argparse.Namespace) -> int:
    from raykd.tune import ablation, study
    from raykd.tune.config import AblationConfig

    d = _folder(args.dir)
    if (d / ablation.ABLATION_FILE).exists():
        abl = parse_config(read_yaml(d / ablation.ABLATION_FILE), AblationConfig)
        paths = ablation.write_report(d, abl)
    elif (d / study.STUDY_FILE).exists():
        paths = study.write_report(d)
    else:
        raise ConfigError(args.dir, "neither a study (study.yaml) nor an ablation (ablation.yaml) folder")
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def _examples(*commands: str) -> str:
    return "examples:\n" + "\n".join(f"  {c}" for c in commands)


#: each subcommand's one-line help, its description and its examples (``raykd <command> --help``)
COMMANDS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "train": (
        "one training run (Ray Train, DDP)",
        "Train one run config with Ray Train (DDP over scaling.num_workers workers). An unfinished run in "
        "the same folder is resumed from its latest checkpoint.",
        ("raykd train run.yaml", "raykd train run.yaml --set train.lr=0.01 --out runs/lr01",
         "raykd train runs/quickstart/best.yaml      # an exported best config -> runs/quickstart-best"),
    ),
    "study": (
        "hyperparameter studies (Ray Tune + Optuna)",
        "Hyperparameter studies: Ray Tune runs the trials, Optuna's TPE suggests them.",
        ("raykd study run studies/quickstart.yaml", "raykd study status runs/quickstart",
         "raykd study resume runs/quickstart", "raykd study export runs/quickstart --out best.yaml"),
    ),
    "study run": (
        "start a study",
        "Start a study. Every check runs before Ray starts; the study folder holds the trials, optuna.db, "
        "study.md and best.yaml.",
        ("raykd study run studies/quickstart.yaml",
         "raykd study run studies/quickstart_repeats.yaml   # 3 seeds per configuration, ranked on mean - std",
         "raykd study run study.yaml --address auto --storage /mnt/nfs/raykd"),
    ),
    "study status": (
        "table of trials, best marked (while it runs or after)",
        "The trial table of a study folder, best marked; works while the study runs.",
        ("raykd study status runs/quickstart",),
    ),
    "study resume": (
        "finish an interrupted study; finished trials are kept",
        "Finish an interrupted study from its folder: finished trials are kept, unfinished ones continue "
        "from their latest checkpoint.",
        ("raykd study resume runs/quickstart",),
    ),
    "study export": (
        "write the best trial's complete run config",
        "Write the best trial's complete run config, with its metrics and provenance, re-runnable with "
        "raykd train.",
        ("raykd study export runs/quickstart --out best.yaml",
         "raykd study export runs/quickstart --out top.yaml --top-k 3",
         "raykd study export runs/kd_student_size_pareto --pareto --out pareto/"),
    ),
    "ablate": (
        "grid over one or two knobs x seeds -> CSV (mean +- std) + PNG",
        "Train every grid value x seed through Ray Tune; writes ablation.csv, a table and a plot per metric.",
        ("raykd ablate studies/fixmatch_threshold_ablation.yaml",),
    ),
    "report": (
        "tables and plots of a study or ablation folder",
        "Write the tables and plots of a study or ablation folder again from its files.",
        ("raykd report runs/quickstart",),
    ),
    "methods": (
        "list methods, their knobs, defaults and search ranges",
        "The registered methods, what each needs, its knobs and their search spaces.",
        ("raykd methods", "raykd methods layermatch"),
    ),
}


def _command(sub: Any, name: str, key: str, parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    short, description, examples = COMMANDS[key]
    return sub.add_parser(name, parents=parents, help=short, description=description, epilog=_examples(*examples))


def build_parser() -> argparse.ArgumentParser:
    import raykd

    p = _Parser(prog="raykd", description="Semi-supervised knowledge distillation on Ray Train + Tune.",
                epilog=_examples("raykd methods", "raykd train run.yaml", "raykd study run studies/quickstart.yaml",
                                 "raykd study status runs/quickstart"))  # fmt: skip
    p.add_argument("--version", action="version", version=f"raykd {raykd.__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("--verbose", action="store_true", help="full tracebacks (and Ray's own logs)")
    common = argparse.ArgumentParser(add_help=False, parents=[verbose])
    common.add_argument(
        "--address", help="Ray cluster to join: auto or HOST:PORT (default: $RAY_ADDRESS, else start a local Ray)"
    )

    tr = _command(sub, "train", "train", [common])
    tr.add_argument("config", help="run config YAML")
    tr.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set method.threshold=0.9 (repeatable)",
    )
    tr.add_argument("--out", help="run folder (default runs/<config name>)")
    tr.set_defaults(func=cmd_train)

    st = _command(sub, "study", "study", [])
    st_sub = st.add_subparsers(dest="study_command", required=True, parser_class=_Parser)
    sr = _command(st_sub, "run", "study run", [common])
    sr.add_argument("config", help="study YAML (name, base, search, tune)")
    sr.add_argument(
        "--storage",
        help="parent folder of the study folder (default runs/); on a cluster a folder every node mounts, "
        "or a cloud URI such as s3://bucket/raykd (docs/cluster.md)",
    )
    sr.add_argument("--name", help="study name (default: the file's name field)")
    sr.set_defaults(func=cmd_study_run)
    ss = _command(st_sub, "status", "study status", [verbose])
    ss.add_argument("dir", help="study folder, e.g. runs/quickstart")
    ss.set_defaults(func=cmd_study_status)
    su = _command(st_sub, "resume", "study resume", [common])
    su.add_argument("dir", help="study folder")
    su.set_defaults(func=cmd_study_resume)
    se = _command(st_sub, "export", "study export", [verbose])
    se.add_argument("dir", help="study folder")
    se.add_argument("--out", required=True, help="output YAML, e.g. best.yaml")
    se.add_argument("--top-k", type=_positive, default=1, help="also write the next K-1 as <out>_top<N>.yaml")
    se.add_argument("--force", action="store_true", help="replace --out files that are not this study's exports")
    se.add_argument("--pareto", action="store_true", help="a study with tune.objectives: one config per Pareto "
                    "trial, as --out/<trial_id>.yaml (--out is a folder)")  # fmt: skip
    se.set_defaults(func=cmd_study_export)

    ab = _command(sub, "ablate", "ablate", [common])
    ab.add_argument("config", help="ablation YAML (name, base, grid, seeds, metric)")
    ab.add_argument("--storage", help="parent folder of the ablation folder (default runs/)")
    ab.set_defaults(func=cmd_ablate)

    rp = _command(sub, "report", "report", [verbose])
    rp.add_argument("dir", help="study or ablation folder")
    rp.set_defaults(func=cmd_report)

    me = _command(sub, "methods", "methods", [verbose])
    me.add_argument("name", nargs="?", help="one method in full: every knob's type, default, range, search and help")
    me.set_defaults(func=cmd_methods)
    return p


def _subparser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)parser of the command ``args`` came from, for its usage line."""
    for name in ("command", "study_command"):
        action = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        chosen = getattr(args, name, None)
        if action is None or chosen not in action.choices:
            break
        parser = action.choices[chosen]
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's own reporter off: raykd prints its own table
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        _subparser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"raykd: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - one readable line; the traceback with --verbose
        if getattr(args, "verbose", False):
            raise
        msg = str(e).strip().splitlines()
        print(
            f"raykd: {type(e).__name__}: {msg[-1] if msg else ''} (rerun with --verbose for details)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
