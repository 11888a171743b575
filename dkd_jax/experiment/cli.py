"""``python -m dkd_jax.experiment``: run, summarize or reproduce an experiment."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from dkd_jax import cli_args, eval_lib, host_memory, jsonio, records, run_dir
from dkd_jax import config as config_lib
from dkd_jax.experiment.report import (
    build_summary,
    format_summary_text,
    has_validation,
    write_summary,
)
from dkd_jax.experiment.runner import reproduce, run_experiment
from dkd_jax.experiment.spec import PAPER_SEEDS, STUDENT_LOSSES, ExperimentError, make_spec


def parse_ints(text: str | None, what: str) -> tuple[int, ...] | None:
    if text is None or text == "":
        return None
    out = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part[1:]:  # a range "0-4"
            lo, hi = part.split("-", 1)
            try:
                lo, hi = int(lo), int(hi)
            except ValueError:
                raise ExperimentError(f"bad {what} {text!r}: {part!r} is not a range") from None
            if hi < lo:
                raise ExperimentError(f"bad {what} {text!r}: {part!r} is a reversed range")
            out.extend(range(lo, hi + 1))
            continue
        try:
            out.append(int(part))
        except ValueError:
            raise ExperimentError(f"bad {what} {text!r}: {part!r} is not an integer") from None
    if len(set(out)) != len(out):
        raise ExperimentError(f"bad {what} {text!r}: repeated values")
    return tuple(out)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dkd_jax.experiment",
        description="Run a whole protocol (teacher + distilled students per fold/seed), "
        "summarise it, or check that it reproduces bit for bit.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser(
        "run",
        help="train + evaluate every fold/seed, then summarise (resumable)",
        description="Extra arguments --config.GROUP.FIELD=VALUE override the config of every run.",
    )
    r.add_argument("--data", required=True, help="prep directory (data_prep output)")
    r.add_argument("--out", required=True, help="experiment directory")
    r.add_argument("--protocol", choices=("loso", "paper"), default="loso")
    r.add_argument("--folds", help="loso folds, e.g. 0,1 or 0-4 (default: all sessions)")
    r.add_argument(
        "--seeds",
        help="loso: training seeds (default: the preset's); paper: split seeds "
        f"(default {','.join(map(str, PAPER_SEEDS))})",
    )
    r.add_argument("--preset", default="default", help="config preset of the runs")
    r.add_argument("--teacher-preset", default="", help="config preset of the teacher")
    r.add_argument(
        "--students", default="dkd", help=f"comma-separated subset of {','.join(STUDENT_LOSSES)}"
    )
    r.add_argument(
        "--overwrite",
        action="store_true",
        help="if --out holds other settings, delete its runs; delete and retrain any run "
        "trained with another config than planned (e.g. a preset changed since)",
    )
    r.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars and no heartbeat lines (a line per finished run remains)",
    )
    r.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="fold/seed groups trained at the same time (threads; bit-identical results)",
    )
    r.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip the feature-statistics baseline (logistic regression) on each fold",
    )
    r.add_argument(
        "--validation-only",
        action="store_true",
        help="choose settings without seeing the held-out speakers: print only validation "
        "scores (needs --config.data.validation=speaker|utterance) and write no summary",
    )
    s = sub.add_parser("summarize", help="rewrite summary.json/summary.md from finished runs")
    s.add_argument("exp_dir")
    s.add_argument(
        "--validation-only",
        action="store_true",
        help="print only validation scores; write nothing",
    )
    q = sub.add_parser("reproduce", help="rerun finished runs and compare them bit for bit")
    q.add_argument("exp_dir")
    q.add_argument("--fold", type=int, help="loso fold (or paper seed) to rerun")
    q.add_argument("--model", help="teacher or a student objective (dkd, ce, ...)")
    q.add_argument(
        "--scratch",
        help="where the reruns go (default EXP/reproduce): a new or empty folder, or an "
        "earlier reproduce folder, which is emptied first",
    )
    q.add_argument(
        "--data",
        help="the prep to rerun on, when it moved since (default: the experiment's); it must "
        "hold what the runs trained on (the same content hash)",
    )
    q.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    host_memory.configure()  # before JAX runs anything (see dkd_jax.host_memory)
    overrides = [a for a in argv if a.startswith("--config.")]
    args = _parser().parse_args([a for a in argv if not a.startswith("--config.")])
    return guarded("experiment", lambda: _command(args, overrides))


def guarded(tool: str, command) -> int:
    """Runs ``command()`` (which returns an exit status) with the command lines' error rules:
    a known problem or an OS error is one line ``<tool>: error: ...`` (exit status 2), Ctrl-C
    says how to resume (130). Anything else is a bug and keeps its traceback."""
    from dkd_jax import distributed, train_lib

    known = (
        ExperimentError,
        eval_lib.EvalError,
        records.DataError,
        config_lib.ConfigError,
        run_dir.RunDirError,
        train_lib.TrainingError,
        distributed.DistributedError,
        ValueError,  # data_prep's PrepError, audio errors
    )
    try:
        with cli_args.sigterm_as_interrupt():
            return command()
    except KeyboardInterrupt as e:
        what, status = cli_args.stopped_message(e)
        print(f"{what}: run the same command again to resume", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        run_dir.release_held_locks()  # those of the runs still on other threads (--jobs)
        os._exit(status)  # concurrent groups (--jobs) run on threads that would finish their run
    except OSError as e:
        print(f"{tool}: error: {jsonio.describe_os_error(e)}", file=sys.stderr)
        return 2
    except known as e:
        print(f"{tool}: error: {e}", file=sys.stderr)
        return 2


def _command(args, overrides: list[str]) -> int:
    if args.command == "run":
        if args.jobs < 1:
            raise ExperimentError(f"--jobs must be >= 1, got {args.jobs}")
        spec = make_spec(
            data=args.data,
            protocol=args.protocol,
            folds=parse_ints(args.folds, "--folds"),
            seeds=parse_ints(args.seeds, "--seeds"),
            preset=args.preset,
            teacher_preset=args.teacher_preset,
            students=[s for s in args.students.split(",") if s],
            overrides=overrides,
        )
        run_experiment(
            args.out,
            spec,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            validation_only=args.validation_only,
            baselines=not args.no_baseline,
            jobs=args.jobs,
        )
        return 0
    if overrides:
        raise ExperimentError(f"{args.command} takes no --config overrides")
    if args.command == "summarize":
        if args.validation_only:
            summary = build_summary(args.exp_dir)
            if not has_validation(summary):
                raise ExperimentError(
                    f"{args.exp_dir}: no finished run has a validation hold-out "
                    "(data.validation=none)"
                )
            print(format_summary_text(summary, validation_only=True))
        else:
            print(format_summary_text(write_summary(args.exp_dir)))
        return 0
    report = reproduce(
        args.exp_dir,
        fold=args.fold,
        model=args.model,
        scratch=args.scratch,
        data=args.data,
        progress=not args.no_progress,
    )
    return 0 if report["match"] else 1


if __name__ == "__main__":
    sys.exit(main())
