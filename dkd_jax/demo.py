"""The README's main job: the whole pipeline on a synthetic corpus, in a few CPU minutes.

``python -m dkd_jax.demo`` runs, on a fresh clone and with no data to download:

1. ``data_prep.synth``: a synthetic emotional-speech corpus in the IEMOCAP release layout
   ("demo" size: 5 sessions, ~420 utterances) → ``OUT/corpus``;
2. ``data_prep.prepare``: MFCC-26 features (26 × 63 per 2-s window, the head-fusion lineage
   front end and about a fifth of the compute of 40 × 200 log-mel) → ``OUT/prep``;
3. ``dkd_jax.experiment``: the speaker-independent ``loso`` protocol with the "demo" config
   preset: per held-out session a head-fusion teacher (8 heads × 256) trained with
   cross-entropy, a student (4 × 64) distilled from it with DKD, and the same student trained
   with cross-entropy alone for comparison → ``OUT/experiment``;
4. the summary table (mean ± std over folds), whether the students beat chance and the
   feature-statistics baseline, and where the
   results and plots are.

Every stage is resumable: re-running reuses the corpus, the prep and the finished folds.
``--quick`` runs two folds only (a smoke test of a minute or two).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from dkd_jax import cli_args

CHANCE = 0.25  # four balanced-UA classes
QUICK_FOLDS = (0, 1)
STAGES = 4  # corpus, features, protocol, result


def _stage(num: int, total: int, text: str) -> float:
    print(f"\n[{num}/{total}] {text}", flush=True)
    return time.perf_counter()


def _done(t0: float, what: str) -> None:
    print(f"      {what} ({time.perf_counter() - t0:.1f} s)", flush=True)


def run_demo(
    out: str | Path = "runs/demo",
    *,
    folds: Sequence[int] | None = None,
    quick: bool = False,
    progress: bool = True,
    workers: int | None = None,
    corpus_size: str = "demo",
    preset: str = "demo",
    jobs: int = 3,
    overwrite: bool = False,
) -> dict:
    """Runs the demo end to end (resumable) and returns the experiment summary.

    Args:
        out: output directory (corpus/, prep/, experiment/ inside).
        folds: loso folds to run (default all five; ``quick``: 0 and 1).
        quick: two folds only, in their own experiment directory.
        progress: progress bars (only on a terminal).
        workers: processes for corpus synthesis and feature extraction (default: CPU count).
        corpus_size: ``data_prep.synth`` size preset (tests use "tiny").
        preset: training config preset of every run (tests use "tiny").
        jobs: folds trained at the same time (threads of this process; the numbers do not
            depend on it). On the 2-core machine 3 finished the demo in 196 s, 2 in 213 s, with
            glibc's default allocator; 3 in 167 s with ``dkd_jax.host_memory``.
        overwrite: delete and retrain runs in ``out`` that were trained with another config
            (a demo run by an earlier version whose preset differed); without it they are
            refused with a one-line error.
    """
    from data_prep import synth

    out = Path(out)
    sessions = synth.SIZE_PRESETS[corpus_size]["sessions"]  # checked before any work
    if folds is not None and (not folds or any(not 0 <= f < sessions for f in folds)):
        from dkd_jax.experiment import ExperimentError

        raise ExperimentError(
            f"--folds {list(folds)}: the synthetic corpus has {sessions} sessions, folds "
            f"0..{sessions - 1}"
        )
    t_all = time.perf_counter()
    corpus, prep = out / "corpus", out / "prep"
    exp_dir = out / ("experiment-quick" if quick else "experiment")
    _make_corpus(corpus, size=corpus_size, workers=workers, progress=progress)
    _make_prep(corpus, prep, workers=workers, progress=progress)
    if folds is None:
        folds = QUICK_FOLDS if quick else None
    summary = _run_protocol(
        prep, exp_dir, folds=folds, preset=preset, progress=progress, jobs=jobs, overwrite=overwrite
    )
    _print_result(summary, exp_dir)
    print(f"      total wall time {time.perf_counter() - t_all:.0f} s")
    return summary


def _make_corpus(corpus: Path, *, size: str, workers: int | None, progress: bool) -> None:
    from data_prep import synth

    t0 = _stage(1, STAGES, f"synthetic IEMOCAP-layout corpus ({size!r} size) -> {corpus}")
    info = synth.generate_corpus(corpus, size=size, seed=0, workers=workers, progress=progress)
    _done(
        t0,
        f"{info['num_utterances']} utterances, {info['num_sessions']} sessions, "
        f"{info['total_duration_s'] / 60:.1f} min of audio",
    )


def _make_prep(corpus: Path, prep: Path, *, workers: int | None, progress: bool) -> None:
    import data_prep

    t0 = _stage(2, STAGES, f"features: MFCC-26, 2-s windows (26 x 63) -> {prep}")
    meta = data_prep.prepare(
        "iemocap",
        out_dir=prep,
        root=corpus,
        dialogs="all",
        feature_config="mfcc26",
        workers=workers,
        progress=progress,
    )
    for line in data_prep.prep_summary(meta).splitlines():
        print(f"      {line}")
    _done(t0, "prep ready")


def _run_protocol(
    prep: Path, exp_dir: Path, *, folds, preset: str, progress: bool, jobs: int, overwrite: bool
) -> dict:
    from dkd_jax import experiment

    spec = experiment.make_spec(
        data=prep, protocol="loso", folds=folds, preset=preset, students=("dkd", "ce")
    )
    t0 = _stage(
        3,
        STAGES,
        f"loso protocol, folds {list(spec.folds)}, {preset!r} preset: teacher (CE), DKD student, "
        f"CE student per fold -> {exp_dir}",
    )
    summary = experiment.run_experiment(
        exp_dir, spec, progress=progress, quiet=False, jobs=jobs, overwrite=overwrite
    )
    _done(t0, "experiment finished")
    return summary


def _print_result(summary: dict, exp_dir: Path) -> None:
    from dkd_jax import experiment

    _stage(4, STAGES, "result")
    for model in ("dkd", "ce", "teacher", "baseline"):
        stats = summary["models"].get(model)
        uas = [r["ua"] for r in summary["runs"] if r["model"] == model]
        if not stats or not uas:
            continue
        ua = stats["ua"]["mean"]
        verdict = "above" if ua > CHANCE else "NOT above"
        above = sum(u > CHANCE for u in uas)
        print(
            f"      {stats['label']}: UA {100 * ua:.1f} % on held-out sessions (folds "
            f"{100 * min(uas):.1f}-{100 * max(uas):.1f} %; {above} of {len(uas)} above chance), "
            f"{verdict} the {100 * CHANCE:.0f} % chance level on average"
        )
    if summary.get("baseline_verdict"):
        print(f"      {summary['baseline_verdict']}")
    print(f"      summary table: {exp_dir / experiment.SUMMARY_MD} (and {experiment.SUMMARY_JSON})")
    print(f"      confusion matrices pooled over folds: {exp_dir}/confusion_<model>.png")
    print(
        f"      per run: {exp_dir}/<fold>/<model>/results.json, confusion.png, metrics.jsonl, "
        "tensorboard/"
    )
    print(f"      TensorBoard: tensorboard --logdir {exp_dir}")
    for line in _next_steps(summary, exp_dir):
        print(f"      {line}")


def _next_steps(summary: dict, exp_dir: Path) -> list[str]:
    """What to try next with the distilled student (the first DKD run of the demo)."""
    dkd = [r["workdir"] for r in summary["runs"] if r["model"] == "dkd"]
    if not dkd:
        return []
    run = exp_dir / dkd[0]
    return [
        "next:",
        f"  predict audio files: python eval.py predict --workdir {run} a.wav b.wav",
        f"  export the student:  python -m dkd_jax.export --workdir {run} --out student_onnx",
        "                       then python eval.py predict --model student_onnx --stream a.wav",
        "  your own corpus:     README, 'Bringing your own corpus' (a CSV manifest)",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    from dkd_jax import host_memory

    host_memory.configure()  # before JAX runs anything (see dkd_jax.host_memory)
    from dkd_jax.experiment import cli

    p = argparse.ArgumentParser(
        prog="python -m dkd_jax.demo",
        description="Synthetic corpus -> features -> loso teacher + DKD/CE students -> summary "
        "(a few minutes on 2 CPU cores; resumable).",
    )
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--folds", help="loso folds, e.g. 0,1 or 0-4 (default: all five)")
    p.add_argument("--quick", action="store_true", help="two folds only (a quick smoke test)")
    p.add_argument("--workers", type=int, help="processes for synthesis and features")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--jobs",
        type=cli_args.positive_int,
        default=3,
        help="folds trained at once (default 3; same numbers)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="retrain runs in --out trained with another config (e.g. by an earlier version)",
    )
    args = p.parse_args(argv)
    if args.quick and args.folds is not None:
        p.error("--quick runs folds 0 and 1: give --folds or --quick, not both")

    def command() -> int:
        run_demo(
            args.out,
            folds=cli.parse_ints(args.folds, "--folds"),
            quick=args.quick,
            progress=not args.no_progress,
            workers=args.workers,
            jobs=args.jobs,
            overwrite=args.overwrite,
        )
        return 0

    return cli.guarded("demo", command)


if __name__ == "__main__":
    sys.exit(main())
