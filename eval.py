"""Score a trained run on its held-out utterances, or predict the emotion of audio files.

Thin command line over ``dkd_jax.eval_lib``::

    python eval.py --workdir RUN_DIR [--data PREP_DIR] [--step N] [--best] [--cpu-devices N]
    python eval.py predict --workdir RUN_DIR FILE.wav [FILE.wav ...] [--segments] [--json OUT]
        [--group SPEAKER FILE [FILE ...]] [--groups path_speaker.csv] [--cpu-devices N]
    python eval.py predict --model EXPORT_DIR FILE.wav [...] | --stream FILE.wav|- [--rate HZ]

The first form writes ``RUN_DIR/results.json`` (WA, UA, per-class scores, confusion matrix,
counts, package versions, device, git commit, data hash, config), ``RUN_DIR/confusion.png`` and
``RUN_DIR/utterance_scores.csv`` (one row per held-out utterance), and prints the table. The
second prints per-file (and with ``--segments`` per-window) probabilities; unreadable files are
reported one line each on stderr (exit status 2). With ``--model`` (a folder written by
``python -m dkd_jax.export``) the same runs on onnxruntime without importing JAX
(``dkd_jax.deploy``); ``--stream`` prints one line per 0.4-s hop.
``--cpu-devices N`` (JAX forms, CPU only) splits every batch over N JAX CPU devices, as
``train.py --cpu-devices`` trains: on 2 cores with ``conv_algorithm="taps"`` the student's
forward ran 1.2-1.5x faster than on one device (README: Speed against PyTorch).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from dkd_jax import cli_args


def _add_cpu_devices(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cpu-devices",
        type=cli_args.positive_int,
        metavar="N",
        help="CPU only: split every batch over N JAX CPU devices (data parallel over the "
        "cores, as train.py --cpu-devices). Default: JAX's CPU device count",
    )


def _use_cpu_devices(args) -> bool:
    """Applies --cpu-devices before JAX starts; False (after a one-line error) if it cannot."""
    if args.cpu_devices is None:
        return True
    from dkd_jax import distributed

    try:
        distributed.use_cpu_devices(args.cpu_devices)
    except distributed.DistributedError as e:
        print(f"eval.py: error: {e}", file=sys.stderr)
        return False
    return True


def _eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python eval.py",
        description="Score a run's checkpoint on its held-out utterances (segment logits "
        "averaged per utterance). Use `python eval.py predict --help` for audio files.",
    )
    p.add_argument("--workdir", required=True, help="training workdir of the run")
    p.add_argument("--data", help="prep dir (default: the one in the run's config)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--best", action="store_true", help="best-by-validation checkpoint")
    p.add_argument(
        "--batch-size", type=cli_args.positive_int, help="segments per batch (default: config)"
    )
    p.add_argument(
        "--aggregate",
        choices=("logits", "probs"),
        default="logits",
        help="average segment logits (default, PyTorch lineage) or probabilities",
    )
    p.add_argument("--no-write", action="store_true", help="print only; write no files")
    _add_cpu_devices(p)
    return p


def _predict_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python eval.py predict",
        description="Emotion probabilities of audio files (any sample rate, channels, length) "
        "with a trained run's features and normalisation.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="training workdir of the run")
    source.add_argument("--model", help="exported folder (python -m dkd_jax.export); no JAX")
    p.add_argument("files", nargs="*", help="audio files (each its own speaker)")
    p.add_argument(
        "--group",
        nargs="+",
        action="append",
        default=[],
        metavar=("SPEAKER", "FILE"),
        help="one speaker's name, then its files (at least one), normalised together when the "
        "run used per-speaker normalisation; one --group per speaker (a file after a --group's "
        "files belongs to it: put ungrouped files before the first --group or after another "
        "option)",
    )
    p.add_argument("--groups", help="CSV with columns path,speaker: files and their speakers")
    p.add_argument("--segments", action="store_true", help="also show each 2-s window")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--best", action="store_true", help="best-by-validation checkpoint")
    p.add_argument("--json", dest="json_out", help="also write the predictions to this JSON file")
    stream = p.add_argument_group("streaming (with --model)")
    stream.add_argument(
        "--stream",
        metavar="FILE|-",
        help="one line per 0.4-s hop of a long file, or of raw 16-bit PCM on stdin (-)",
    )
    stream.add_argument(
        "--rate", type=cli_args.positive_int, help="stdin sample rate (default: the model's)"
    )
    stream.add_argument("--channels", type=cli_args.positive_int, help="stdin channels (default 1)")
    stream.add_argument(
        "--smooth",
        type=cli_args.nonnegative_float,
        help="time constant (s) of the moving average of probabilities; 0 = off (default 1)",
    )
    stream.add_argument("--jsonl", action="store_true", help="JSON lines instead of the table")
    p.add_argument(
        "--threads", type=cli_args.positive_int, help="onnxruntime threads (--model; default: all)"
    )
    _add_cpu_devices(p)
    return p


def _files_and_groups(args, parser) -> tuple[list[str], list[str | None]]:
    """The files to predict and each file's speaker group (None: on its own)."""
    files: list[str] = list(args.files)
    groups: list[str | None] = [None] * len(files)
    for name, *members in args.group:
        if not members:
            parser.error(f"--group {name} names no file (use --group SPEAKER FILE [FILE ...])")
        for member in members:
            # A member that does not exist is most often the next speaker's name (--group s1
            # a.wav s2 b.wav puts b.wav into s1): refused before it moves s1's statistics.
            if not os.path.exists(member):
                parser.error(
                    f"--group {name}: {member}: no such file (one --group per speaker: "
                    f"--group {name} FILE ... --group OTHER FILE ...)"
                )
        files += members
        groups += [name] * len(members)
    if args.groups:
        # data_prep's manifest reader: the same header, separators, quoting, empty rows,
        # Unicode forms of names and paths relative to the CSV's folder.
        from data_prep import manifest, sources

        try:
            rows = list(manifest.read_rows(args.groups, required=("path", "speaker")))
        except OSError as e:
            parser.error(f"--groups {args.groups}: {e.strerror}")
        except sources.PrepError as e:
            parser.error(f"--groups {e}")
        if not rows:
            parser.error(f"--groups {args.groups}: no rows under its header (no files to predict)")
        for line, r in rows:
            if not r["path"]:
                parser.error(f"--groups {args.groups}:{line}: the row names no path")
            files.append(r["full"])
            groups.append(r["speaker"] or None)
    return files, groups


def _check_predict_options(args, parser) -> None:
    """Refuses options that the chosen path would ignore (a user expecting a JSON file from
    --stream --json would otherwise find none)."""
    given = {
        "--json": args.json_out is not None,
        "--segments": args.segments,
        "--step": args.step is not None,
        "--best": args.best,
        "--rate": args.rate is not None,
        "--channels": args.channels is not None,
        "--smooth": args.smooth is not None,
        "--jsonl": args.jsonl,
    }
    given["--threads"] = args.threads is not None
    if args.stream is not None:
        unused = ["--json", "--segments", "--step", "--best"]
        why = "with --stream (the rows go to stdout; --jsonl for JSON lines)"
        if args.stream != "-":
            unused += ["--rate", "--channels"]
            why = "with --stream FILE (the rows go to stdout; --rate and --channels: stdin only)"
    else:
        unused = ["--rate", "--channels", "--smooth", "--jsonl"]
        why = "without --stream"
        if args.model:
            unused = ["--step", "--best", *unused]
            why = "here (--step, --best: a checkpoint of --workdir; the others need --stream)"
        else:
            unused = ["--threads", *unused]
            why = "with --workdir (--threads: onnxruntime, --model; the others need --stream)"
    ignored = [name for name in unused if given[name]]
    if ignored:
        parser.error(f"{', '.join(ignored)}: not used {why}")
    _one_checkpoint(args, parser)


def _one_checkpoint(args, parser) -> None:
    """Refuses --step with --best (the best checkpoint used to be taken in silence)."""
    if args.step is not None and args.best:
        parser.error("--step and --best: choose one checkpoint")


def _json_target_problem(path: str) -> str | None:
    """Why ``--json PATH`` could not be written, checked before any scoring (or None)."""
    from dkd_jax import jsonio

    target = Path(path)
    if target.is_dir():
        return f"{path}: is a folder"
    parent = target.parent
    if not parent.is_dir():
        return f"{parent}: {'not a folder' if parent.exists() else 'no such folder'}"
    problem = jsonio.unwritable(parent)  # written beside, then renamed: a new file must fit
    return f"{parent}: cannot write into it ({problem})" if problem else None


def _predict_main(argv: list[str]) -> int:
    parser = _predict_parser()
    # Files may follow an option (a.wav --json o b.wav); intermixed parsing cannot take `--`
    # (a file named like an option: -- -x.wav), which the plain parse still does.
    parse = parser.parse_args if "--" in argv else parser.parse_intermixed_args
    args = parse(argv)
    if args.model and args.cpu_devices is not None:
        parser.error("--cpu-devices splits JAX's CPU (--workdir); with --model use --threads")
    _check_predict_options(args, parser)
    if args.stream is not None:
        if not args.model:
            parser.error("--stream needs --model (an exported folder)")
        from dkd_jax import streaming  # onnxruntime only: nothing on this path imports JAX

        return streaming.stream_cli(args)
    if args.json_out is not None and (problem := _json_target_problem(args.json_out)):
        print(f"eval.py: error: --json {problem}", file=sys.stderr)
        return 2
    files, groups = _files_and_groups(args, parser)
    if args.model:  # onnxruntime only: nothing on this path imports JAX
        from dkd_jax import deploy

        return deploy.predict_cli(args, files, groups)
    if not files:
        print("eval.py: error: no audio files given", file=sys.stderr)
        return 2
    if not _use_cpu_devices(args):
        return 2
    from dkd_jax import eval_lib, jsonio, predict

    try:
        pred = predict.predict_files(
            args.workdir,
            files,
            step=args.step,
            best=args.best,
            segments=args.segments,
            groups=groups,
        )
    except OSError as e:
        print(f"eval.py: error: {jsonio.describe_os_error(e)}", file=sys.stderr)
        return 2
    except eval_lib.EvalError as e:
        print(f"eval.py: error: {e}", file=sys.stderr)
        return 2
    return predict.report_predictions(pred, json_out=args.json_out)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "predict":
        return _predict_main(argv[1:])
    parser = _eval_parser()
    args = parser.parse_args(argv)
    _one_checkpoint(args, parser)
    if not _use_cpu_devices(args):
        return 2
    from dkd_jax import eval_lib, jsonio, records, run_dir

    try:
        eval_lib.evaluate_run(
            args.workdir,
            data_dir=args.data,
            step=args.step,
            best=args.best,
            batch_size=args.batch_size,
            mode=args.aggregate,
            write=not args.no_write,
        )
    except OSError as e:
        print(f"eval.py: error: {jsonio.describe_os_error(e)}", file=sys.stderr)
        return 2
    except (eval_lib.EvalError, records.DataError, run_dir.RunDirError) as e:
        print(f"eval.py: error: {e}", file=sys.stderr)
        return 2
    if not args.no_write:
        results, confusion, scores = (
            os.path.join(args.workdir, name)
            for name in (run_dir.RESULTS_FILE, run_dir.CONFUSION_FILE, run_dir.SCORES_FILE)
        )
        print(f"wrote {results}, {confusion} and {scores}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
