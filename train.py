"""Train a teacher (CE) or distil a student (DKD, KD, CE, TCKD, NCKD): thin CLI over train_lib.

  python train.py --data PREP --workdir runs/teacher --role teacher
  python train.py --data PREP --workdir runs/dkd --role student --teacher runs/teacher
  python train.py ... --preset paper --loss kd --config.kd.temperature=2 --config.optim.num_epochs=9
  python train.py ... --cpu-devices 4     # CPU host: the batch split over 4 cores (data parallel)

Rerunning the same command resumes from the last checkpoint. Multi-host: see dkd_jax.distributed.

Frequent --config. overrides (every field: dkd_jax/config.py; README: Training):
  --config.data.fold=N              loso: which session is held out (0-based, sorted by name)
  --config.optim.num_epochs=N       training length (a short run can end at chance: train.py
                                    warns when the model predicts one class for everything)
  --config.optim.batch_size=N       global batch (a multiple of the device count)
  --config.data.normalization=M     none | global | utterance | speaker (a student's must be
                                    its teacher's)
  --config.data.validation=speaker  hold out training speakers for the best checkpoint
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from dkd_jax import cli_args


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        i = rest.index(bad[0])
        if i and rest[i - 1].startswith("--config.") and "=" not in rest[i - 1]:
            p.error(f"{rest[i - 1]} {bad[0]}: write {rest[i - 1]}={bad[0]} (with '=')")
        p.error(f"unrecognized arguments: {' '.join(bad)} (overrides look like --config.kd.beta=2)")
    problem = _option_conflict(args, rest)
    if problem:
        p.error(problem)

    from dkd_jax import host_memory

    host_memory.configure()  # before JAX runs anything (see dkd_jax.host_memory)

    from dkd_jax import config as config_lib
    from dkd_jax import distributed, jsonio, records, train_lib

    cfg = None
    try:
        cfg = _setup(args, rest)
        # No progress bar where stderr is no terminal (nohup, SLURM, `2> log`): a line there
        # every HEARTBEAT_SECONDS instead, so a log never goes quiet for long.
        quiet_log = cfg.train.progress and not sys.stderr.isatty()
        # After _setup: jax.distributed.initialize installs JAX's preemption notifier, a
        # SIGTERM handler that only logs; this one replaces it (a multi-host run stops too).
        with cli_args.sigterm_as_interrupt():
            result = train_lib.train_and_evaluate(
                cfg,
                args.workdir,
                teacher_workdir=args.teacher,
                overwrite=args.overwrite,
                heartbeat_seconds=HEARTBEAT_SECONDS if quiet_log else 0.0,
                heartbeat_stream=sys.stderr,
            )
    except OSError as e:  # read-only or full workdir, permissions: the path and the reason
        if os.environ.get("DKD_JAX_DEBUG"):
            raise
        print(f"train.py: error: {jsonio.describe_os_error(e)}", file=sys.stderr)
        return 2
    except (
        config_lib.ConfigError,
        records.DataError,
        train_lib.TrainingError,
        distributed.DistributedError,
        ValueError,
    ) as e:
        if os.environ.get("DKD_JAX_DEBUG"):
            raise
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except MemoryError as e:  # e.g. numpy's "Unable to allocate 5.96 TiB for an array ..."
        if os.environ.get("DKD_JAX_DEBUG"):
            raise
        print(
            f"train.py: error: out of host memory ({e or 'MemoryError'}); a smaller "
            "optim.batch_size or data.eval_batch_size needs less",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt as e:
        what, status = cli_args.stopped_message(e)
        print(f"train.py: {what}; rerun {_resume_command(args, cfg)} to resume", file=sys.stderr)
        return status
    if result["test"] is None and cfg.data.protocol == "none":
        print(
            "train.py: note: data.protocol='none' holds out nothing, so there are no test "
            "scores and no results.json",
            file=sys.stderr,
        )
    from dkd_jax import run_dir

    written = (run_dir.RESULTS_FILE, run_dir.CONFUSION_FILE, run_dir.SCORES_FILE)
    if result["test"] is not None and (Path(args.workdir) / run_dir.RESULTS_FILE).is_file():
        print(f"train.py: wrote {', '.join(str(Path(args.workdir) / n) for n in written)}",
              file=sys.stderr)  # fmt: skip
    summary = {k: result[k] for k in ("step", "epoch", "test", "best_validation")}
    if summary["test"]:
        summary["test"] = {k: summary["test"][k] for k in ("wa", "ua", "num_utterances")}
    print(json.dumps(summary))
    return 0


def _resume_command(args: argparse.Namespace, cfg) -> str:
    """The command that resumes a stopped run: the same one, but without --overwrite once the
    new run has replaced the old one (it would delete what the new run saved). Stopped before
    that, the old run is still there and --overwrite is still needed."""
    if not args.overwrite or cfg is None:
        return "the same command"
    from dkd_jax import run_dir

    try:
        replaced = (Path(args.workdir) / run_dir.CONFIG_FILE).is_file() and not (
            run_dir.config_changes(args.workdir, cfg)
        )
    except run_dir.RunDirError:
        replaced = False
    return "the same command without --overwrite" if replaced else "the same command"


HEARTBEAT_SECONDS = 60.0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", required=True, help="prep directory (data_prep output)")
    p.add_argument("--workdir", required=True, help="run directory (created or resumed)")
    p.add_argument("--role", choices=("teacher", "student"), default="student")
    p.add_argument("--teacher", help="teacher workdir (students with a distillation loss)")
    p.add_argument("--loss", choices=("dkd", "kd", "ce", "tckd", "nckd"), help="student loss")
    p.add_argument("--preset", default="default", help="default | paper | demo | emodb | tiny")
    p.add_argument("--overwrite", action="store_true", help="replace a different run in workdir")
    p.add_argument("--distributed", action="store_true", help="jax.distributed auto-detect")
    p.add_argument("--coordinator", help="multi-host coordinator HOST:PORT")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    p.add_argument(
        "--cpu-devices",
        type=cli_args.positive_int,
        metavar="N",
        help="CPU only: split the CPU into N JAX devices, each taking 1/N of every batch (data "
        "parallel over the cores; README: Training, 'Several CPU cores'). Default: JAX's CPU "
        "device count (one unless JAX_NUM_CPU_DEVICES or XLA_FLAGS set it)",
    )
    return p


def _setup(args: argparse.Namespace, overrides: list[str]):
    """Devices and processes as the options ask, then the run's config (preset + options +
    ``--config.`` overrides); notes on stderr where an option has no effect."""
    import jax

    from dkd_jax import config as config_lib
    from dkd_jax import distributed

    if args.cpu_devices is not None:
        distributed.use_cpu_devices(args.cpu_devices)
    distributed.maybe_initialize_distributed(
        args.coordinator, args.num_processes, args.process_id, auto=args.distributed
    )
    if args.cpu_devices is not None and jax.default_backend() != "cpu":
        print(
            f"train.py: --cpu-devices applies to the CPU only; this run uses the "
            f"{jax.default_backend()} devices",
            file=sys.stderr,
        )
    fixed = [f"data.prep_dir={args.data}", f"model.role={args.role}"]
    if args.loss:
        fixed.append(f"kd.loss={args.loss}")
    cfg = config_lib.apply_overrides(config_lib.get_config(args.preset), fixed + overrides)
    if args.teacher and cfg.kd.loss == "ce":
        raise ValueError(
            f"--teacher {args.teacher}: a student trained with kd.loss='ce' uses no teacher "
            "(drop --teacher, or pick a distillation loss with --loss)"
        )
    for note in _unused_override_notes(cfg, overrides):
        print(f"train.py: note: {note}", file=sys.stderr)
    if args.cpu_devices and cfg.train.num_devices not in (0, args.cpu_devices):
        print(
            f"train.py: --cpu-devices {args.cpu_devices} but train.num_devices="
            f"{cfg.train.num_devices}: this run uses {cfg.train.num_devices} of them",
            file=sys.stderr,
        )
    return cfg


def _unused_override_notes(cfg, overrides: list[str]) -> list[str]:
    """A note for each ``--config.`` override this run never reads (``--loss kd
    --config.kd.beta=2``: KD has no beta), which used to be accepted without a word."""
    from dkd_jax import objective

    fields = [item[len("--config.") :].split("=", 1)[0].strip() for item in overrides]
    role, loss = cfg.model.role, cfg.kd.loss
    out = []
    for field in objective.unused_settings(fields, role=role, loss=loss):
        if field.startswith("model."):
            why = (
                "a student distils from the --teacher run, whose own config gives its network"
                if role == "student"
                else "a teacher trains model.teacher"
            )
        elif role == "teacher":
            why = "a teacher trains on CE alone"
        elif loss == "ce":
            why = "a CE student uses no distillation setting"
        else:
            why = f"kd.loss={loss!r} does not use it"
        out.append(f"--config.{field}: not used ({why})")
    return out


# Config fields that an explicit option sets: an override of them would silently win.
_OPTION_FIELDS = {"data.prep_dir": "--data", "model.role": "--role", "kd.loss": "--loss"}


def _option_conflict(args: argparse.Namespace, overrides: list[str]) -> str | None:
    """Options that contradict each other or do nothing for the chosen role (None: none)."""
    for item in overrides:
        field = item[len("--config.") :].split("=", 1)[0].strip()
        option = _OPTION_FIELDS.get(field)
        if option == "--loss" and args.loss is None:
            continue  # --config.kd.loss alone picks the loss, as --loss does
        if option:
            given = item.split("=", 1)[0].strip()
            return f"{given} conflicts with {option}: set it with {option} only"
    if args.role == "teacher":
        unused = [o for o, v in (("--teacher", args.teacher), ("--loss", args.loss)) if v]
        if unused:
            return f"{' and '.join(unused)}: not used with --role teacher (a teacher trains on CE)"
    return None


if __name__ == "__main__":
    sys.exit(main())
