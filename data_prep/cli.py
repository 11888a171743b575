"""Command line of the offline data step (``python -m data_prep`` / ``dkd-data-prep``).

  python -m data_prep iemocap --root IEMOCAP_full_release --out DIR [--dialogs all|improvised|
      scripted] [--happy exc|hap+exc|hap] [--classes neutral,happy,sad,angry]
  python -m data_prep emodb --root path/to/emodb/wav --out DIR [--classes ...]
  python -m data_prep csv --manifest corpus.csv --out DIR [--corpus NAME] [--classes ...]
      [--label-map anger=angry,joy=happy|map.json] [--exclude-labels fear,disgust]
      [--ignore-unknown-labels] [--duplicates error|keep-first]
  python -m data_prep synth --out CORPUS_DIR [--size demo|tiny|iemocap] [--seed N]
      [--speaker-confound F] [--manifest] [--workers N] [--no-progress]

Feature/run options of the three corpus sources: ``--features logmel40|logmel64|logmel128|
mfcc26``, ``--short pad|drop``, ``--workers N``, ``--shards N``, ``--overwrite``,
``--no-progress``, ``--max-segments-per-utterance N``, ``--max-utterance-share F``. Errors are
reported in one line, ``data_prep: error: PATH: reason`` (exit 2); an interrupted run (Ctrl-C:
exit 130, SIGTERM: exit 143) resumes when the same command is run again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

from data_prep import manifest, pipeline
from data_prep.summary import prep_summary
from dkd_jax import audio, jsonio

PROG = "data_prep"


def _error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="prep dir to write (created; resumable)")
    p.add_argument(
        "--features",
        default="logmel40",
        choices=sorted(audio.FEATURE_PRESETS),
        help="feature preset (default logmel40: 40 log-mel bands, 25 ms / 10 ms, 40x200 segments)",
    )
    p.add_argument(
        "--short",
        default="pad",
        choices=("pad", "drop"),
        help="utterances shorter than one 2-s window: pad to one window (default) or drop "
        "(paper protocol); both are counted in metadata.json",
    )
    p.add_argument(
        "--workers", type=int, default=None, help="feature processes (default: CPU count)"
    )
    p.add_argument(
        "--shards", type=int, default=None, help="shards per split (default: 1 per 256 utterances)"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a prep run with a different configuration found in --out",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--max-segments-per-utterance",
        type=int,
        default=None,
        metavar="N",
        help="keep at most N train-layout windows of an utterance, spread over it (default all; "
        "the eval layout keeps every window)",
    )
    p.add_argument(
        "--max-utterance-share",
        type=float,
        default=pipeline.DEFAULT_MAX_UTTERANCE_SHARE,
        metavar="F",
        help="warn when one utterance supplies more than this share of the train segments "
        "and more than twice an even share (default 0.1)",
    )
    p.add_argument(
        "--classes",
        default=None,
        help="comma-separated class names in label-id order (default neutral,happy,sad,angry)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser (one subcommand per source)."""
    parser = argparse.ArgumentParser(
        prog="python -m data_prep",
        description="Turn a speech-emotion corpus into TFRecord shards of 2-s feature segments.",
    )
    sub = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")

    p = sub.add_parser("iemocap", help="IEMOCAP release layout (Session1..5)")
    p.add_argument("--root", required=True, help="folder holding Session1..Session5")
    p.add_argument(
        "--dialogs",
        default="all",
        choices=("all", "improvised", "scripted"),
        help="dialogs to keep (default all; the paper protocol selects improvised at training "
        "time from the utterance table)",
    )
    p.add_argument(
        "--happy",
        default="exc",
        choices=("exc", "hap+exc", "hap"),
        help="IEMOCAP labels forming 'happy' (default exc, the paper lineage)",
    )
    _add_common(p)

    p = sub.add_parser("emodb", help="EmoDB (Berlin) WAV folder")
    p.add_argument("--root", required=True, help="folder with the EmoDB WAVs (or holding wav/)")
    _add_common(p)

    p = sub.add_parser("csv", help="any corpus listed in a CSV manifest")
    p.add_argument(
        "--manifest",
        required=True,
        help="CSV with header path,label,speaker[,session,gender,utterance_id] (README: "
        "'Preparing data')",
    )
    p.add_argument("--corpus", default="csv", help="corpus / TFDS dataset name (default csv)")
    p.add_argument(
        "--label-map",
        default=None,
        metavar="MAP",
        help='rename labels to classes: anger=angry,joy=happy, or a JSON file {"anger": "angry"}',
    )
    p.add_argument(
        "--exclude-labels",
        default=None,
        metavar="LABELS",
        help="labels to leave out (counted), e.g. fear,disgust; <empty> for empty label cells "
        "(a class is left out with --classes instead)",
    )
    p.add_argument(
        "--ignore-unknown-labels",
        action="store_true",
        help="leave out (and count) every label that is not a class, instead of failing",
    )
    p.add_argument(
        "--duplicates",
        default="error",
        choices=manifest.DUPLICATE_POLICIES,
        help="rows repeating a file or its audio (SHA-256): error (default) or keep-first",
    )
    _add_common(p)

    p = sub.add_parser("synth", help="generate a synthetic corpus in the IEMOCAP layout")
    p.add_argument("--out", required=True, help="corpus folder to create")
    p.add_argument("--size", default="demo", help="size preset: demo, tiny or iemocap")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--speaker-confound",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="share of speakers who show one emotion only (default 0)",
    )
    p.add_argument(
        "--manifest",
        action="store_true",
        help="also write manifest.csv (path,label,speaker,session,gender; labels as words) to "
        "prepare the corpus with `data_prep csv` like a corpus of your own",
    )
    return parser


def _run_synth(args) -> int:
    try:
        from data_prep import synth
    except ImportError as e:
        return _error(f"the synthetic corpus generator is not available ({e})")
    if args.size not in getattr(synth, "SIZE_PRESETS", {args.size: None}):
        return _error(f"unknown --size {args.size!r}; choose from {sorted(synth.SIZE_PRESETS)}")
    summary = synth.generate_corpus(
        args.out,
        size=args.size,
        seed=args.seed,
        workers=args.workers,
        progress=not args.no_progress,
        speaker_confound=args.speaker_confound,
        manifest=args.manifest,
    )
    print(json.dumps(summary, indent=1, default=str))
    print(
        f"corpus written to {args.out}; prepare it with: python -m data_prep iemocap "
        f"--root {args.out} --out PREP_DIR"
        + (
            f" (or as a CSV corpus: python -m data_prep csv --manifest {args.out}/"
            f"{synth.MANIFEST_FILE} --out PREP_DIR --label-map ...)"
            if args.manifest
            else ""
        )
    )
    return 0


def _source_options(args) -> dict:
    if args.source == "iemocap":
        options = {"root": args.root, "dialogs": args.dialogs, "happy": args.happy}
    elif args.source == "emodb":
        options = {"root": args.root}
    else:
        options = {
            "manifest": args.manifest,
            "corpus": args.corpus,
            "label_map": args.label_map,
            "exclude_labels": args.exclude_labels,
            "ignore_unknown_labels": args.ignore_unknown_labels,
            "duplicates": args.duplicates,
        }
    if args.classes is not None:  # "" is an empty list, refused as such (not the default)
        options["classes"] = args.classes
    return options


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 error, 130 Ctrl-C, 143 SIGTERM)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from data_prep.sources import PrepError
    from data_prep.workers import Terminated
    from dkd_jax.records import DataError

    try:
        if args.source == "synth":
            return _run_synth(args)
        cfg = dataclasses.replace(audio.FEATURE_PRESETS[args.features], short_utterances=args.short)
        before = _metadata_stamp(args.out)
        meta = pipeline.prepare(
            args.source,
            out_dir=args.out,
            feature_config=cfg,
            workers=args.workers,
            progress=not args.no_progress,
            overwrite=args.overwrite,
            num_shards=args.shards,
            max_segments_per_utterance=args.max_segments_per_utterance,
            max_utterance_share=args.max_utterance_share,
            **_source_options(args),
        )
    except KeyboardInterrupt as e:
        what = "terminated" if isinstance(e, Terminated) else "interrupted"
        print(f"\n{what}; run the same command again to resume where it stopped", file=sys.stderr)
        return 128 + e.signum if isinstance(e, Terminated) else 130
    except OSError as e:
        return _error(jsonio.describe_os_error(e))
    except (PrepError, DataError, audio.AudioError, ValueError) as e:
        return _error(str(e))
    print(prep_summary(meta))
    if before is not None and _metadata_stamp(args.out) == before:
        print(f"{os.path.abspath(args.out)} was already prepared: nothing written")
    else:
        print(f"wrote {os.path.abspath(args.out)}")
    return 0


def _metadata_stamp(out_dir: str) -> tuple[int, int] | None:
    """(inode, mtime) of the prep's metadata.json, None without one: a finished run rewrites it."""
    from dkd_jax import records

    try:
        info = os.stat(os.path.join(out_dir, records.METADATA_FILE))
    except OSError:
        return None
    return info.st_ino, info.st_mtime_ns


if __name__ == "__main__":
    sys.exit(main())
