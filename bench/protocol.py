"""Times a whole protocol end to end: synthetic corpus → features → every training run.

The GPU goal of #13 is "the whole ``paper`` protocol (5 seeds × teacher + DKD student, 50 epochs)
on an IEMOCAP-sized synthetic corpus in under 10 minutes". This script measures exactly that, as a
user would run it, through the library's public functions:

1. ``data_prep.synth.generate_corpus`` (``--size``, default ``iemocap``: ~7k utterances, ~8.5 h);
2. ``data_prep.prepare`` with the IEMOCAP reader (``--features``, default ``logmel40``: 40×200);
3. ``dkd_jax.experiment.run_experiment`` (``--protocol``/``--preset``, default ``paper``/``paper``,
   the students of ``--students``, ``--jobs`` runs at once).

Every phase is timed (wall seconds; CPU seconds of this process and its workers); every finished
run adds a row with its training and compile seconds and its test WA/UA (from the run's
``results.json``). The JSON is printed at the end and, with ``--out``, also rewritten after
every phase and every finished run, so a run cut short by a time limit still leaves what it
measured (``"complete": false``).
``--work`` keeps the corpus, the prep and the experiment; a second call with the same ``--work``
and settings reuses the corpus and the prep and resumes the experiment, timing only what it did
(each run's row says whether it was trained or skipped). Other settings in the same ``--work``
are refused by the library's own checks (corpus size, feature config, experiment settings).

  python bench/protocol.py --out bench/results/protocol_paper_gpu.json       # on a GPU host
  python bench/protocol.py --size tiny --features mfcc26 --preset tiny --epochs 2  # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from dkd_jax import host_memory, jsonio  # noqa: E402  (neither imports JAX)

HOST_MEMORY = host_memory.configure()  # before JAX runs anything, as train.py does

import benchjson  # noqa: E402  (bench/ is the script directory)

# data_prep and dkd_jax.experiment are imported in main(): synthesis and feature workers start
# by spawn and re-import this script, and should not pay for JAX and the experiment runner.

PROG = "protocol"


def _fail(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


class Report:
    """The JSON being built; ``save()`` rewrites ``--out`` (when given) with what is known."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        import jax

        self.out = args.out
        self.lock = threading.Lock()  # with --jobs > 1, runs finish on the runner's threads
        self.data: dict[str, Any] = {
            "benchmark": "bench/protocol.py",
            "command": " ".join(["bench/protocol.py", *sys.argv[1:]]),
            "complete": False,
            "backend": jax.default_backend(),
            "devices": [d.device_kind for d in jax.devices()],
            "jax": jax.__version__,
            "python": platform.python_version(),
            "host_cpu_count": os.cpu_count(),
            "host_memory": HOST_MEMORY,
            "settings": {
                "size": args.size,
                "features": args.features,
                "protocol": args.protocol,
                "preset": args.preset,
                "students": list(args.students),
                "seeds": args.seeds,
                "folds": args.folds,
                "epochs": args.epochs,
                "jobs": args.jobs,
                "work": str(work),
            },
            "load_before": list(os.getloadavg()),
            "phases": {},
            "runs": [],
        }

    def phase(self, name: str, wall_s: float, cpu_s: float, **extra: Any) -> None:
        with self.lock:
            self.data["phases"][name] = {
                "wall_s": round(wall_s, 2),
                "cpu_s": round(cpu_s, 2),
                **extra,
            }
        self.save()

    def add_run(self, row: dict[str, Any]) -> None:
        with self.lock:
            self.data["runs"].append(row)
        self.save()

    def save(self) -> None:
        if not self.out:
            return
        with self.lock:  # whole files only (jsonio: written aside, then renamed over --out)
            jsonio.write_text(self.out, json.dumps(self.data, indent=1) + "\n")


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished child processes (synthesis/feature workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _timed(fn):
    wall, cpu = time.perf_counter(), _cpu_seconds()
    value = fn()
    return value, time.perf_counter() - wall, _cpu_seconds() - cpu


def _segments(meta: dict[str, Any]) -> dict[str, int]:
    return {name: split["num_segments"] for name, split in meta.get("splits", {}).items()}


def _make_corpus(args: argparse.Namespace, corpus: Path, report: Report) -> None:
    """Generates the corpus, or finishes/reuses one in ``corpus`` made with the same size and
    seed (``generate_corpus`` refuses a folder holding another one)."""
    from data_prep import synth

    info, wall, cpu = _timed(
        lambda: synth.generate_corpus(
            corpus, size=args.size, seed=0, workers=args.workers, progress=args.progress
        )
    )
    report.phase(
        "corpus",
        wall,
        cpu,
        utterances=info["num_utterances"],
        audio_minutes=round(info["total_duration_s"] / 60, 1),
    )


def _make_prep(args: argparse.Namespace, corpus: Path, prep: Path, report: Report) -> None:
    """Prepares the features, or reuses/resumes a prep of the same corpus and feature config
    (``prepare`` checks its fingerprint and refuses a folder prepared otherwise)."""
    import data_prep
    from dkd_jax import records

    _, wall, cpu = _timed(
        lambda: data_prep.prepare(
            "iemocap",
            out_dir=prep,
            root=corpus,
            dialogs="all",
            feature_config=args.features,
            workers=args.workers,
            progress=args.progress,
        )
    )
    report.phase("prep", wall, cpu, segments=_segments(records.load_metadata(prep)))


def _run_row(exp_dir: Path, plan, status: str) -> dict[str, Any]:
    from dkd_jax.experiment.spec import run_dir_name

    row: dict[str, Any] = {"group": plan.group, "model": plan.model, "status": status}
    path = exp_dir / plan.group / run_dir_name(plan.model) / "results.json"
    if path.is_file():
        results = json.loads(path.read_text())
        row.update(
            train_s=results.get("train_seconds"),
            compile_s=results.get("compile_seconds"),
            steps=results.get("step"),
            wa=results.get("wa"),
            ua=results.get("ua"),
        )
    return row


def _run_experiment(args: argparse.Namespace, prep: Path, exp_dir: Path, report: Report) -> None:
    from dkd_jax import experiment

    overrides = [f"optim.num_epochs={args.epochs}"] if args.epochs else []
    spec = experiment.make_spec(
        data=prep,
        protocol=args.protocol,
        folds=args.folds,
        seeds=args.seeds,
        preset=args.preset,
        students=args.students,
        overrides=overrides,
    )
    start = time.perf_counter()

    def on_run(plan, status: str) -> None:
        row = _run_row(exp_dir, plan, status)
        row["finished_after_s"] = round(time.perf_counter() - start, 2)
        report.add_run(row)

    summary, wall, cpu = _timed(
        lambda: experiment.run_experiment(
            exp_dir,
            spec,
            progress=args.progress,
            quiet=not args.progress,
            on_run=on_run,
            jobs=args.jobs,
        )
    )
    models = {
        name: {"wa": stats["wa"]["mean"], "ua": stats["ua"]["mean"]}
        for name, stats in summary["models"].items()
    }
    trained = [r for r in report.data["runs"] if r["status"] == "trained"]
    report.phase(
        "experiment",
        wall,
        cpu,
        runs_trained=len(trained),
        runs_skipped=len(report.data["runs"]) - len(trained),
        train_s_sum=round(sum(r.get("train_s") or 0.0 for r in trained), 2),
        compile_s_sum=round(sum(r.get("compile_s") or 0.0 for r in trained), 2),
        models=models,
    )


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """The arguments, every one checked before anything is built (a bad preset must not cost
    the minutes of an IEMOCAP-sized corpus first)."""
    from data_prep import synth
    from dkd_jax import audio
    from dkd_jax import config as config_lib
    from dkd_jax.experiment import STUDENT_LOSSES, ExperimentError
    from dkd_jax.experiment.cli import parse_ints

    p = argparse.ArgumentParser(prog=f"python bench/{PROG}.py", description=__doc__.split("\n")[0])
    p.add_argument("--work", help="keep corpus/, prep/, experiment/ here (default: a temp dir)")
    p.add_argument("--size", default="iemocap", choices=sorted(synth.SIZE_PRESETS))
    p.add_argument("--features", default="logmel40", choices=sorted(audio.FEATURE_PRESETS))
    p.add_argument("--protocol", default="paper", choices=("paper", "loso"))
    p.add_argument("--preset", default="paper", choices=sorted(config_lib.PRESETS))
    p.add_argument("--students", default="dkd", help="comma-separated students (default dkd)")
    p.add_argument("--seeds", help="comma-separated seeds (default: the protocol's)")
    p.add_argument("--folds", help="loso folds, comma-separated (default: all)")
    p.add_argument("--epochs", type=int, help="override optim.num_epochs (smoke tests)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once (default 1)")
    p.add_argument("--workers", type=int, help="processes for synthesis and features")
    p.add_argument("--progress", action="store_true", help="progress bars and per-run lines")
    p.add_argument("--out", help="also write the JSON here (rewritten as the phases finish)")
    args = p.parse_args(argv)
    args.students = tuple(s for s in args.students.split(",") if s)
    try:
        args.seeds = parse_ints(args.seeds, "--seeds")
        args.folds = parse_ints(args.folds, "--folds")
    except ExperimentError as err:
        _fail(str(err))
    bad = [s for s in args.students if s not in STUDENT_LOSSES]
    if bad or not args.students or len(set(args.students)) != len(args.students):
        _fail(f"--students: choose distinct ones of {', '.join(STUDENT_LOSSES)}, got {bad or '?'}")
    if args.folds is not None and args.protocol != "loso":
        _fail("--folds is for --protocol loso (paper runs seeds)")
    if args.epochs is not None and args.epochs < 1:
        _fail(f"--epochs must be >= 1, got {args.epochs}")
    if args.jobs < 1:
        _fail(f"--jobs must be >= 1, got {args.jobs}")
    if args.work and Path(args.work).exists() and not Path(args.work).is_dir():
        _fail(f"--work {args.work}: exists and is not a folder")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    from dkd_jax import experiment, records

    with tempfile.TemporaryDirectory(prefix="dkd_jax_protocol_") as tmp:
        work = Path(args.work or tmp).resolve()
        report = Report(args, work)
        total = time.perf_counter()
        try:
            report.save()  # an unwritable --out fails now, not after the corpus
            work.mkdir(parents=True, exist_ok=True)
            _make_corpus(args, work / "corpus", report)
            _make_prep(args, work / "corpus", work / "prep", report)
            _run_experiment(args, work / "prep", work / "experiment", report)
        except (experiment.ExperimentError, records.DataError, ValueError, OSError) as err:
            report.data["error"] = str(err)
            try:
                report.save()
            except OSError:
                pass  # the --out that failed; the message below says why
            hint = f" (--work {work} holds what earlier calls made)" if args.work else ""
            _fail(f"{err}{hint}")
        report.data["total_wall_s"] = round(time.perf_counter() - total, 2)
        report.data["load_after"] = list(os.getloadavg())
        report.data["loadavg_at_end"] = report.data["load_after"]  # as every bench JSON has it
        report.data["complete"] = True
        report.save()
        return benchjson.emit(report.data, None)


if __name__ == "__main__":
    sys.exit(main())
