"""Training: ``train_and_evaluate`` as named phases, and its epoch loops (the data-parallel
step itself is ``train_step``'s).

``train_and_evaluate(config, workdir)`` trains one model (a teacher on cross-entropy, or a
student on DKD or one of its ablations, see ``objective``) and evaluates it, in five phases:

1. :func:`_resolve_run`: the config, the split, the workdir check (``run_dir``), the data
   (``input_pipeline.load_run_data``: training arrays, held-out sets, normalisation) and the
   devices and batch layout;
2. :func:`_prepare_teacher`: students restore their frozen teacher, check that it saw the same
   data, and precompute its logits when that is exact;
3. :func:`_build_state`: the model, the compiled functions, the initial state or the newest
   readable checkpoint, and the run's files (config, split, normalisation, metrics);
4. :func:`_run_epochs`: the loop (on-device or streaming, below);
5. :func:`_finish`: the final checkpoint, the final record, and ``results.json``,
   ``utterance_scores.csv`` and ``confusion.png`` from the last evaluation (``eval_lib``).

The whole run holds the workdir's lock (``run_dir.locked``; process 0 in a multi-host run).

Non-finite losses. Each step checks its global loss, gradient norm and update norm; a
non-finite one keeps the previous state and records the step in ``TrainState.bad_step``, after
which every step is a no-op. The host looks at the per-step flag whenever it fetches metrics
(every log interval / epoch, never a sync per step), saves the last good state and raises
``NonFiniteLossError`` naming the step, epoch and batch (``train_loop``).

Data parallelism. One ``jax.pmap`` over the local devices (``distributed.AXIS``): a global
batch of B segments is split evenly into ``[devices, B / devices]`` (B must be divisible by the
total device count); each device's loss is its sum over real segments divided by the global
count of real segments, so ``psum`` of the gradients is exactly the gradient of the global-batch
mean. BatchNorm is synchronised (``MACNN.batch_norm_axis_name``): its batch statistics are means
over all devices, so N devices compute what one device computes on the whole batch (up to float
summation order). The state is donated; the frozen teacher's variables are replicated once and
never donated. Every step draws its randomness (augmentation, dropout) from
``fold_in(fold_in(rng, step), device)``.

Padding. The last batch of an epoch is completed with copies of real segments (the start of the
epoch's permutation) with ``mask = False``: they get zero loss weight and no metric weight, and
nothing is dropped. They do enter that one step's BatchNorm batch statistics: Flax's masked
BatchNorm combined with a mapped axis averages the per-device masked means without weighting
them by their counts (wrong statistics, NaN on a device holding only filler), so no mask is
passed and the filler is real data rather than zeros.

Teacher. The teacher is restored from its workdir (``run_dir.restore_run``), runs in eval mode
(running BatchNorm statistics) under ``stop_gradient`` and is never in the student's checkpoint.
Without augmentation its logits on the training segments never change, so they are computed once
per run (exact, DESIGN.md §5); with augmentation it runs live on the augmented batch.

Two execution paths with the same data order (``input_pipeline.epoch_order``):

* on-device (default on GPU/TPU when the training split fits, ``train.on_device``): the split
  is replicated on every local device and an epoch is one compiled ``lax.scan`` over its steps,
  shuffling on the device;
* streaming (default on CPU): host batches gathered in a background thread, one compiled step
  per batch. XLA:CPU runs convolution weight gradients inside a compiled loop about 100x slower
  than in a standalone step (jax 0.10.2), so the on-device loop is slower there, not faster.

Both compile once per run (``TRACE_COUNTS`` counts traces; tests fail if an epoch retraces).
Multi-host runs (``distributed``): every process reads its share of the training shards and
draws its own permutation of it (``fold_in(epoch_key, process_index)``); evaluation runs on every
process over the whole held-out set; process 0 writes the files.

Resume: rerunning the same command continues from the newest readable checkpoint and reaches
bit-identical parameters and metrics (CPU): the data order, RNG and metric accumulators are
functions of (seed, step) and the accumulators are saved with each checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from dkd_jax import config as config_lib
from dkd_jax import (
    confound,
    conv_taps,
    distributed,
    eval_lib,
    input_pipeline,
    jsonio,
    models,
    objective,
    protocols,
    records,
    run_dir,
    train_loop,
    train_state,
    train_step,
)
from dkd_jax.train_loop import NonFiniteLossError, SimulatedAbort, TrainingError

__all__ = [
    "NonFiniteLossError",
    "SimulatedAbort",
    "TeacherMismatchError",
    "TrainingError",
    "train_and_evaluate",
]


class TeacherMismatchError(TrainingError):
    """The teacher was trained on other data than the student's training split."""


# --------------------------------------------------------------------------------------------
# train_and_evaluate and its phases
# --------------------------------------------------------------------------------------------


CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"


def enable_compilation_cache(cache_dir: str | os.PathLike) -> bool:
    """Turns on JAX's persistent compilation cache in ``cache_dir`` (created if missing), for
    every compile whatever its time or size (``train.compilation_cache_dir``; the experiment
    runner points every run at ``EXP/.jax_cache``).

    A cache named in the environment (``JAX_COMPILATION_CACHE_DIR``, JAX's own setting) wins,
    so one cache can serve several experiments. Returns whether ``cache_dir`` was enabled."""
    if os.environ.get(CACHE_ENV):
        return False
    path = Path(cache_dir)
    path.mkdir(parents=True, exist_ok=True)
    problem = jsonio.unwritable(path)
    if problem:  # JAX would warn once per program it cannot store, tracebacks included
        if str(path.absolute()) not in _UNWRITABLE_CACHES:  # the runner and each run ask
            _UNWRITABLE_CACHES.add(str(path.absolute()))
            print(
                f"warning: compilation cache {path} is not writable ({problem}); compiling "
                "without it",
                file=sys.stderr,
            )
        return False
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return True


#: Caches already reported as not writable (one warning per folder and process).
_UNWRITABLE_CACHES: set[str] = set()


def train_and_evaluate(
    config: config_lib.Config,
    workdir: str | os.PathLike,
    *,
    teacher_workdir: str | os.PathLike | None = None,
    overwrite: bool = False,
    heartbeat_seconds: float = 0.0,
    heartbeat_stream=None,
    label: str = "",
    data_warnings: bool = True,
) -> dict[str, Any]:
    """Trains one model (teacher or student) and evaluates it on the held-out utterances.

    Args:
      config: resolved config (``config.data.prep_dir`` names the data; ``config.model.role``
        which network trains; ``config.kd.loss`` the student objective).
      workdir: output directory (created; an existing run with the same config is resumed).
      teacher_workdir: the teacher's workdir (students with a distillation loss).
      overwrite: replace a run with a different config in ``workdir``.
      heartbeat_seconds: > 0: print a line with the epoch, step and running loss at this
        interval (``train_loop.Heartbeat``; the experiment runner uses it when progress bars
        cannot show, e.g. in a log file).
      heartbeat_stream: where those lines go (default stdout; ``train.py``: stderr, as its
        stdout is the final JSON summary).
      label: the run's name in those lines (default: the workdir).
      data_warnings: print (stderr) what makes the split's scores say less: classes with no
        training utterance, and with ``normalization=speaker`` a strong speaker–label confound
        among the training speakers or one-emotion held-out speakers (:func:`split_warnings`);
        and a model, or a teacher, that learnt nothing usable on the test set
        (``eval_lib.collapse_note``). The experiment runner says them once per group and in its
        summary instead (and never the test-set one with ``--validation-only``).

    Returns:
      Final metrics: {"step", "epoch", "test": {wa, ua, ...} or None, "validation": ... or None,
      "best_validation": {"ua", "step"} or None, "train": {loss, wa, ua, ...}, "workdir",
      "on_device", "num_devices", "process_count", "teacher"}. The run directory then also holds
      ``results.json`` (the test scores of the last epoch, as ``eval.py`` writes them).

    Raises:
      records.DataError: missing/empty/corrupt prep dir.
      run_dir.WorkdirError: the workdir holds another run, or is in use (its lock is held).
      run_dir.CheckpointError: checkpoints exist but none is readable.
      TeacherMismatchError, NonFiniteLossError, TrainingError: see their docs.
      OSError: the workdir cannot be written (read-only, full disk), with its path.
    """
    cfg = config_lib.from_dict(config_lib.to_dict(config))  # validated private copy
    # config.json records where the data are: an absolute path, so that eval.py finds them
    # from any working directory (a relative --data held only from where train.py ran).
    if cfg.data.prep_dir:
        cfg.data.prep_dir = os.path.abspath(cfg.data.prep_dir)
    if cfg.train.compilation_cache_dir:
        enable_compilation_cache(cfg.train.compilation_cache_dir)
    workdir = Path(workdir)
    clock = train_loop.RunClock()
    primary = jax.process_index() == 0
    beat = None
    if heartbeat_seconds > 0 and primary:
        beat = train_loop.Heartbeat(
            label or str(workdir), heartbeat_seconds, stream=heartbeat_stream
        )
    try:
        with (
            run_dir.locked(workdir, "training", enabled=primary),
            beat or contextlib.nullcontext(),
            clock,
        ):
            run = _resolve_run(cfg, workdir, overwrite, warn=data_warnings and primary)
            if beat is not None:
                beat.total_steps, beat.num_epochs = run.total_steps, cfg.optim.num_epochs
            teacher = _prepare_teacher(run, teacher_workdir)
            _clear_replaced_run(run)
            built = _build_state(run, teacher)
            clock.setup_seconds = clock.elapsed()
            loop = _run_epochs(run, teacher, built, beat)
            return _finish(run, teacher, built, loop, clock)
    except jax.errors.JaxRuntimeError as e:  # pragma: no cover - device dependent
        hint = _oom_hint(e)
        if hint is not None:
            raise hint from e
        raise


def _clear_replaced_run(run: _Run) -> None:
    """``overwrite``: deletes the workdir's old run (process 0), now that the new one has
    passed every check before training; the other processes wait for it."""
    if not run.replace:
        return
    if run.primary:
        run_dir.clear_run(run.workdir)
    distributed.over_processes(0)  # a barrier: no process lists the old checkpoints


@dataclasses.dataclass
class _Run:
    """Phase 1's result: what the run trains on, and how it is laid out on the devices."""

    cfg: config_lib.Config
    workdir: Path
    primary: bool
    num_classes: int
    split: protocols.Split
    info: dict  # the data info stored in split.json
    role: str
    loss: str
    resuming: bool
    data: input_pipeline.RunData
    devices: tuple
    per_device: int
    local_batch: int
    spe: int
    total_steps: int
    untrained: tuple[str, ...] = ()  # classes with no training utterance
    replace: bool = False  # --overwrite: the workdir's old run goes before the first write
    warn: bool = True  # print the data and score warnings (train_and_evaluate's data_warnings)


def split_warnings(metadata: dict[str, Any], split: protocols.Split, normalization: str):
    """What makes a split's scores say less, one warning or note per item (none: nothing):
    classes with no training utterance (``protocols.untrained_warning``), and with
    ``normalization == "speaker"`` a speaker–label confound among the training speakers
    (``confound.normalization_warning``) or held-out speakers of one emotion
    (``confound.held_out_note``)."""
    out = [protocols.untrained_warning(metadata, split)]
    if normalization == "speaker":
        numbers = confound.confound_from_metadata(metadata, split.train_ids)
        out.append(confound.normalization_warning(numbers, normalization))
        out.append(confound.held_out_note(metadata, split.train_ids, split.test_ids))
    return [w for w in out if w]


def _resolve_run(cfg: config_lib.Config, workdir: Path, overwrite: bool, *, warn: bool) -> _Run:
    """Phase 1: the split, the workdir check, the data and the batch layout."""
    prep_dir = cfg.data.prep_dir
    meta = records.load_metadata(prep_dir)
    if not meta.get("utterances"):
        raise records.DataError(f"{prep_dir}: metadata.json lists no utterances")
    num_classes = len(meta.get("label_names", []))
    if num_classes < 2:
        raise records.DataError(
            f"{prep_dir}: metadata.json has {num_classes} label name(s): a classifier needs at "
            "least 2 classes (re-run data_prep with --classes naming two or more)"
        )
    split = protocols.split_for_run(meta, cfg.data)
    info = _data_info(meta, cfg.data.normalization)
    if warn:
        for text in split_warnings(meta, split, cfg.data.normalization):
            print(text, file=sys.stderr, flush=True)
    primary = jax.process_index() == 0
    # With --overwrite the old run is deleted only once the new one has been checked through
    # (data, batch layout, teacher: _clear_replaced_run); a bad argument leaves it as it was.
    resuming = run_dir.prepare_workdir(workdir, cfg, overwrite=overwrite, clear=False)
    if resuming:
        old_split, old_info = run_dir.load_split(workdir)
        if old_split != split or old_info.get("content_hash") != info["content_hash"]:
            raise run_dir.WorkdirError(
                f"{workdir}: the data or split changed since this run started (content hash "
                f"{old_info.get('content_hash')} -> {info['content_hash']}); use --overwrite"
            )
    pidx, pcount = jax.process_index(), jax.process_count()
    data = input_pipeline.load_run_data(
        prep_dir,
        meta,
        split,
        normalization=cfg.data.normalization,
        process_index=pidx,
        process_count=pcount,
    )
    devices = distributed.local_devices(cfg.train.num_devices)
    total_devices = len(devices) * pcount
    if cfg.optim.batch_size % total_devices:
        raise TrainingError(
            f"optim.batch_size={cfg.optim.batch_size} is not divisible by the {total_devices} "
            f"device(s); use a multiple of {total_devices}"
        )
    per_device = cfg.optim.batch_size // total_devices
    local_batch = per_device * len(devices)
    largest_share = int(distributed.over_processes(len(data.train), "max"))
    spe = input_pipeline.steps_per_epoch(largest_share, local_batch)
    if spe * cfg.optim.num_epochs > config_lib.MAX_INT:
        raise TrainingError(
            f"optim.num_epochs={cfg.optim.num_epochs} × {spe} steps per epoch is more steps than "
            "JAX counts in int32 (2**31 - 1)"
        )
    if warn:
        text = oversized_batch_warning(
            cfg.optim.batch_size, largest_share, local_batch, len(devices), pcount
        )
        if text:
            print(text, file=sys.stderr, flush=True)
    role = cfg.model.role
    return _Run(
        cfg=cfg,
        workdir=workdir,
        primary=primary,
        num_classes=num_classes,
        split=split,
        info=info,
        role=role,
        loss="ce" if role == "teacher" else cfg.kd.loss,
        resuming=resuming,
        data=data,
        devices=devices,
        per_device=per_device,
        local_batch=local_batch,
        spe=spe,
        total_steps=spe * cfg.optim.num_epochs,
        untrained=tuple(protocols.untrained_classes(meta, split)),
        replace=overwrite,
        warn=warn,
    )


def oversized_batch_warning(
    batch_size: int, largest_share: int, local_batch: int, local_devices: int, processes: int
) -> str | None:
    """A warning when one process's batch is larger than its training segments (None if not).

    Such a batch is one step an epoch, padded with masked copies of the segments
    (``input_pipeline.epoch_order``): the same training as a batch of about the split's size,
    at ``local_batch / largest_share`` times its compute; usually a batch size meant for a
    larger corpus. Names the largest batch (a multiple of the device count) that is not padded.
    """
    if local_batch <= largest_share:
        return None
    per_device = max(1, largest_share // local_devices)
    where = " on the process with the most" if processes > 1 else ""
    return (
        f"warning: optim.batch_size={batch_size} is larger than the training split "
        f"({largest_share} segment(s){where}): each epoch is one step whose batch is padded "
        f"with {local_batch - largest_share} masked copies, {local_batch / largest_share:.1f}x "
        f"the compute of its real segments; optim.batch_size="
        f"{per_device * local_devices * processes} or less pads little or nothing"
    )


def _data_info(meta: dict, normalization: str) -> dict[str, Any]:
    return {
        "content_hash": meta.get("content_hash"),
        "feature_config": meta.get("feature_config"),
        "label_names": list(meta.get("label_names", [])),
        "segment_shape": list(meta.get("segment_shape", [])),
        "corpus": meta.get("corpus"),
        "normalization": normalization,
        "front_end": records.front_end_version(meta),
    }


@dataclasses.dataclass
class _Teacher:
    """Phase 2's result: the frozen teacher (None for teachers and CE students)."""

    mode: str  # "none" | "precomputed" | "live"
    run: run_dir.RestoredRun | None = None
    workdir: Path | None = None
    logits: np.ndarray | None = None  # precomputed logits of the training segments


def _prepare_teacher(run: _Run, teacher_workdir) -> _Teacher:
    """Phase 2: restore and check the teacher; precompute its logits when that is exact."""
    if run.role != "student" or run.loss == "ce":
        return _Teacher("none")
    if teacher_workdir is None:
        raise TrainingError(f"kd.loss={run.loss!r} needs a teacher: pass --teacher TEACHER_WORKDIR")
    tdir = Path(teacher_workdir)
    try:
        t_split, t_info = run_dir.load_split(tdir)
        restored = run_dir.restore_run(tdir, step_option=False)
    except run_dir.RunDirError as e:
        hint = ""
        if run.resuming and run_dir.training_progress(run.workdir)["finished"]:
            hint = (
                f"; {run.workdir} finished training, and only training needs its teacher: "
                f"score it with python eval.py --workdir {run.workdir}"
            )
        raise TeacherMismatchError(f"cannot use teacher {tdir}: {e}{hint}") from None
    _check_teacher(tdir, t_split, t_info, run.split, run.info)
    if run.resuming:
        _check_same_teacher(run.workdir, tdir, restored)
    if run.warn:
        _warn_if_collapsed_teacher(tdir)
    if restored.warning:  # which checkpoint a partly trained teacher gives: its newest
        print(
            f"warning: the teacher {restored.warning}; distilling from its checkpoint at step "
            f"{restored.step}",
            file=sys.stderr,
        )
    if restored.config.model.role != "teacher":
        print(
            f"note: {tdir} trained a {restored.config.model.role}; using it as the teacher",
            file=sys.stderr,
        )
    if run.cfg.augment.enabled:
        return _Teacher("live", restored, tdir)
    logits = eval_lib.predict_logits(
        restored.model,
        restored.variables,
        run.data.train.features,
        batch_size=run.cfg.data.eval_batch_size,
        devices=run.devices,
    )
    if not np.all(np.isfinite(logits)):
        raise TeacherMismatchError(f"teacher {tdir} gives non-finite logits")
    return _Teacher("precomputed", restored, tdir, logits)


def _warn_if_collapsed_teacher(tdir: Path) -> None:
    """A teacher whose own test scores say it learnt nothing (one class for every utterance,
    or UA at chance) is distilled from with a warning: its student can only learn the same."""
    try:
        res = run_dir.load_results(tdir)
    except run_dir.RunDirError:
        return  # restore_run names a damaged run; results.json is only for this note
    if not res or "confusion_matrix" not in res:
        return
    note = eval_lib.collapse_note(res["confusion_matrix"], res.get("label_names") or [])
    if note:
        print(
            f"warning: the teacher {tdir}: on its test set it {note}; a student distils little "
            f"from it: {eval_lib.COLLAPSE_HINT} of the teacher",
            file=sys.stderr,
        )


def _check_same_teacher(workdir: Path, tdir: Path, restored) -> None:
    """A resumed (or rerun) student distils from the teacher it started with: the same weights
    (their digest), wherever the teacher lies now. Another teacher (another --teacher, or the
    same folder retrained or trained on since) would make a student of two teachers, and its
    teacher.json would name only the second."""
    try:
        old = run_dir.load_teacher(workdir)
    except run_dir.RunDirError as e:
        raise TeacherMismatchError(f"{e}; use --overwrite to start the student again") from None
    if old is None:
        return
    step = int(restored.step)
    if "weights_digest" in old:
        same = old["weights_digest"] == run_dir.variables_digest(restored.variables)
    else:  # recorded before teacher.json held the digest (its model dict may predate fields)
        same = old.get("step") == step
    if not same:
        raise TeacherMismatchError(
            f"{workdir} was distilled from the teacher {old.get('workdir')} (step "
            f"{old.get('step')}); --teacher {tdir} (step {step}) has other weights: resume "
            "with the teacher it started with, or --overwrite to start the student again"
        )


def _check_teacher(teacher_dir: Path, teacher_split, teacher_info, split, info) -> None:
    """Refuses a teacher trained on other data (features, labels, prep, split)."""
    for key, what in (
        ("feature_config", "feature config"),
        ("label_names", "label map"),
        ("content_hash", "prep content hash (another prep of the data)"),
        ("normalization", "feature normalisation"),
    ):
        if teacher_info.get(key) != info.get(key):
            fix = ""
            if key == "normalization":  # e.g. a teacher of --preset emodb, a default student
                fix = (
                    f"; train the student with the teacher's --preset, or "
                    f"--config.data.normalization={teacher_info.get(key)}"
                )
            raise TeacherMismatchError(
                f"teacher {teacher_dir} was trained with a different {what}: "
                f"{teacher_info.get(key)!r} vs the student's {info.get(key)!r}{fix}"
            )
    t_train, s_train = set(teacher_split.train_ids), set(split.train_ids)
    if t_train != s_train:
        leak = t_train & (set(split.test_ids) | set(split.validation_ids))
        extra, missing = len(t_train - s_train), len(s_train - t_train)
        detail = (
            f"{len(leak)} of the student's held-out (test/validation) utterances are in the "
            "teacher's training data (test leak)"
            if leak
            else f"{extra} extra and {missing} missing utterance(s)"
        )
        raise TeacherMismatchError(
            f"teacher {teacher_dir} was trained on a different split ({teacher_split.name}) than "
            f"the student's training split ({split.name}): {detail}; train the teacher with the "
            "same data.protocol/fold/split_seed/validation settings"
        )


@dataclasses.dataclass
class _Built:
    """Phase 3's result: the compiled functions, the (restored) state, the open run files."""

    data: input_pipeline.TrainArrays
    on_device: bool
    eval_model: Any
    fns: train_step.TrainFunctions
    weights: dict
    schedule: Any
    keys: tuple  # (data key, step key)
    state: train_state.TrainState
    start_step: int
    ckpt: Any
    best_ckpt: Any
    logger: run_dir.MetricsWriter
    ck_meta: dict
    r_data: Any = None  # the training split on the devices (on-device path)


def _build_state(run: _Run, teacher: _Teacher) -> _Built:
    """Phase 3: model, compiled functions, the initial or restored state, the run's files."""
    cfg = run.cfg
    data = input_pipeline.TrainArrays(
        run.data.train.features, run.data.train.labels.astype(np.int32), teacher.logits
    )
    on_device = _use_on_device(cfg, run.devices[0], data)
    arch = getattr(cfg.model, run.role)
    mismatch = conv_taps.mismatch(arch.conv_algorithm, run.devices[0].platform, len(run.devices))
    if mismatch:
        print(f"note: model.{run.role}.{mismatch}", file=sys.stderr)
    model = models.create_model(
        arch, num_classes=run.num_classes, batch_norm_axis_name=distributed.AXIS
    )
    eval_model = models.create_model(arch, num_classes=run.num_classes)
    spec = train_step.StepSpec(
        teacher=teacher.mode,
        augment=dataclasses.astuple(cfg.augment),
        num_classes=run.num_classes,
    )
    segment_shape = tuple(data.features.shape[1:])
    fns = train_step.make_train_functions(
        model,
        teacher.run.model if teacher.mode == "live" else None,
        cfg.optim,
        spec,
        run.devices,
    )
    root = jax.random.PRNGKey(cfg.train.seed)
    init_key, data_key, step_key = (jax.random.fold_in(root, i) for i in range(3))
    state = train_state.create_train_state(init_key, eval_model, fns.tx, segment_shape)

    ckpt = run_dir.checkpointer(run.workdir, max_to_keep=cfg.train.keep_checkpoints)
    best_ckpt = None
    if any(s.name == "validation" for s in run.data.eval_sets):
        best_ckpt = run_dir.checkpointer(run.workdir, best=True, max_to_keep=1)
    restored = None
    if run.resuming:
        restored = run_dir.restore_for_resume(run.workdir, ckpt, state, move_aside=run.primary)
    ck_meta: dict = {}
    if restored is not None:
        state, ck_meta = restored
    start_step = int(state.step)
    _write_run_files(run, teacher)
    logger = run_dir.MetricsWriter(run.workdir, enabled=run.primary, resume_step=start_step)
    if run.primary and start_step == 0:
        logger.log(_start_record(run, teacher, len(data), on_device))
    return _Built(
        data=data,
        on_device=on_device,
        eval_model=eval_model,
        fns=fns,
        weights=train_step.hyper(
            objective.loss_weights(run.loss, cfg.kd, role=run.role),
            steps_per_epoch=run.spe,
            total_steps=run.total_steps,
        ),
        schedule=train_state.learning_rate_schedule(
            cfg.optim, steps_per_epoch=run.spe, total_steps=run.total_steps
        ),
        keys=(data_key, step_key),
        state=state,
        start_step=start_step,
        ckpt=ckpt,
        best_ckpt=best_ckpt,
        logger=logger,
        ck_meta=ck_meta,
    )


def _start_record(run: _Run, teacher: _Teacher, num_segments: int, on_device: bool) -> dict:
    """The first metrics.jsonl record of a run: what it trains on and how."""
    return {
        "event": "start",
        "step": 0,
        "role": run.role,
        "loss": run.loss,
        "split": run.split.name,
        "num_train_utterances": len(run.split.train_ids),
        "num_train_segments": num_segments,  # this process's share
        "num_train_segments_global": run.data.num_train_global,
        "steps_per_epoch": run.spe,
        "total_steps": run.total_steps,
        "teacher": teacher.mode,
        "on_device": on_device,
        "num_devices": len(run.devices) * jax.process_count(),
    }


def _use_on_device(cfg: config_lib.Config, device, data: input_pipeline.TrainArrays) -> bool:
    """Whether the training split lives on the device (one compiled scan per epoch)."""
    if cfg.train.on_device != "auto":
        return cfg.train.on_device == "on"
    # Not on XLA:CPU: there the weight-gradient convolutions inside a while loop (the scanned
    # epoch) run ~100x slower than in a standalone step (measured with jax 0.10.2: a 3x3 conv
    # kernel gradient 6.7 s vs 0.066 s; a whole student step 0.93 s vs 0.09 s), and host
    # memory is the device memory anyway, so streaming costs no transfer.
    budget = cfg.train.on_device_max_bytes or input_pipeline.device_memory_budget(device)
    return device.platform != "cpu" and data.nbytes() <= budget


def _write_run_files(run: _Run, teacher: _Teacher) -> None:
    """config.json, split.json, normalization.json and (students) teacher.json."""
    if not run.primary:
        return
    run_dir.write_config(run.workdir, run.cfg)
    run_dir.write_split(run.workdir, run.split, run.info)
    run_dir.write_normalization(run.workdir, run.data.normalization)
    if teacher.run is not None:
        run_dir.write_teacher(
            run.workdir,
            {
                "workdir": str(teacher.workdir.absolute()),
                "step": teacher.run.step,
                "weights_digest": run_dir.variables_digest(teacher.run.variables),
                "model": config_lib.to_dict(teacher.run.config)["model"],
                "mode": teacher.mode,
            },
        )


@dataclasses.dataclass
class _Loop:
    """Phase 4's result."""

    ctx: train_loop.LoopContext
    r_state: Any
    last_eval: dict


def _run_epochs(run: _Run, teacher: _Teacher, built: _Built, heartbeat=None) -> _Loop:
    """Phase 4: the epochs, on the device (one compiled scan each) or streamed step by step."""
    cfg, spe = run.cfg, run.spe
    sums = (
        train_loop.MetricSums(run.num_classes, built.ck_meta.get(k))
        for k in ("interval", "epoch_sums")
    )
    ctx = train_loop.LoopContext(
        cfg=cfg,
        workdir=run.workdir,
        spe=spe,
        total_steps=run.total_steps,
        schedule=built.schedule,
        logger=built.logger,
        ckpt=built.ckpt,
        best_ckpt=built.best_ckpt,
        eval_sets=run.data.eval_sets,
        eval_model=built.eval_model,
        devices=run.devices,
        interval=next(sums),
        epoch_sums=next(sums),
        best=built.ck_meta.get("best", {"ua": None, "step": None}),
        num_classes=run.num_classes,
        teacher=teacher.mode != "none",
        weights=built.weights,
        on_device=built.on_device,
        last_train=built.ck_meta.get("last_train", {}),
        heartbeat=heartbeat,
    )
    r_state = distributed.replicate(built.state, devices=run.devices)
    r_teacher = None
    if teacher.mode == "live":
        variables = teacher.run.variables
        r_teacher = distributed.replicate(
            {"params": variables["params"], "batch_stats": variables["batch_stats"]},
            devices=run.devices,
        )
    if built.on_device:
        arrays = {"features": built.data.features, "labels": built.data.labels}
        if built.data.teacher_logits is not None:
            arrays["teacher_logits"] = built.data.teacher_logits
        built.r_data = distributed.replicate(arrays, devices=run.devices)
    step_args = (r_teacher, built.weights)
    bar = train_loop.progress_bar(run.total_steps, built.start_step, cfg.train.progress)
    last_eval: dict[str, Any] = {}
    try:
        step, steps_this_run = built.start_step, 0
        while step < run.total_steps:
            if built.on_device:
                r_state, done = _device_epoch(run, built, ctx, r_state, step, step_args, bar)
            else:
                r_state, done = _streamed_epoch(
                    run, built, ctx, r_state, step, step_args, bar, steps_this_run
                )
            step += done
            steps_this_run += done
            if 0 < cfg.train.debug_abort_after_steps <= steps_this_run:
                raise SimulatedAbort(f"debug abort after {steps_this_run} steps")
            last_eval = ctx.end_epoch(r_state, step) or last_eval
    finally:
        bar.close()
        built.logger.close()
    return _Loop(ctx, r_state, last_eval)


def _device_epoch(run, built, ctx, r_state, step, step_args, bar):
    """The rest of the epoch that contains ``step`` as one compiled scan; (state, steps)."""
    epoch, first = divmod(step, run.spe)
    t0 = time.perf_counter()
    p_epoch = built.fns.p_epoch(run.spe, run.local_batch, run.per_device, jax.process_index())
    r_state, stacked = p_epoch(
        r_state,
        built.r_data,
        np.arange(len(run.devices), dtype=np.int32),
        *step_args,
        built.keys,
        np.int32(epoch),
        np.int32(first),
    )
    host = distributed.unreplicate(stacked)
    per_step = [{k: v[i] for k, v in host.items()} for i in range(first, run.spe)]
    ctx.consume(per_step, step, r_state, time.perf_counter() - t0, bar)
    return r_state, run.spe - first


def _streamed_epoch(run, built, ctx, r_state, step, step_args, bar, steps_before):
    """The rest of the epoch that contains ``step``, one compiled step per host batch."""
    cfg, spe = run.cfg, run.spe
    epoch, first = divmod(step, spe)
    data_key, step_key = built.keys
    order = input_pipeline.host_epoch_order(
        data_key, epoch, len(built.data), spe, run.local_batch, jax.process_index()
    )
    sharding = distributed.device_axis_sharding(run.devices)
    multi_cpu = run.devices[0].platform == "cpu" and len(run.devices) * jax.process_count() > 1
    # XLA:CPU collectives abort when too many steps are in flight (environment.md §3).
    sync_every = min(cfg.train.log_every_steps, 8) if multi_cpu else cfg.train.log_every_steps
    pending, done, t0 = [], 0, time.perf_counter()
    for batch in input_pipeline.iterate_batches(
        built.data,
        order,
        num_devices=len(run.devices),
        first_step=first,
        put=lambda b: jax.device_put(b, sharding),
    ):
        r_state, m = built.fns.p_step(r_state, batch, *step_args, step_key)
        pending.append(m)
        done += 1
        now = step + done
        end_of_epoch = now % spe == 0
        every = cfg.train.checkpoint_every_steps
        ck_due = bool(every) and now % every == 0
        abort = 0 < cfg.train.debug_abort_after_steps <= steps_before + done
        if len(pending) >= sync_every or end_of_epoch or ck_due or abort:
            host = [distributed.unreplicate(p) for p in pending]
            ctx.consume(host, now - len(pending), r_state, time.perf_counter() - t0, bar)
            pending, t0 = [], time.perf_counter()
        if abort:
            break
        if ck_due and not end_of_epoch:
            ctx.save(r_state, now)
    return r_state, done


def _finish(run: _Run, teacher: _Teacher, built: _Built, loop: _Loop, clock) -> dict[str, Any]:
    """Phase 5: final evaluation and checkpoint, the final record, results.json."""
    ctx, r_state = loop.ctx, loop.r_state
    last_eval = loop.last_eval
    final_state = None  # fetched from the devices only when needed
    if not last_eval:  # resumed a finished run: evaluate the final state again
        final_state = distributed.unreplicate(r_state)
        last_eval = ctx.run_eval(final_state, log=False)
    if built.ckpt.latest_step() != run.total_steps:
        ctx.save(r_state, run.total_steps, state=final_state)
    built.ckpt.close()
    if built.best_ckpt is not None:
        built.best_ckpt.close()
    result = {
        "step": run.total_steps,
        "epoch": run.cfg.optim.num_epochs,
        "test": last_eval.get("test"),
        "validation": last_eval.get("validation"),
        "best_validation": ctx.best if ctx.best.get("ua") is not None else None,
        "train": ctx.last_train,
        "workdir": str(run.workdir),
        "on_device": built.on_device,
        "num_devices": len(run.devices) * jax.process_count(),
        "process_count": jax.process_count(),
        "teacher": teacher.mode,
    }
    if not run.primary:
        return result
    seconds = clock.elapsed()
    record = {"event": "final", "step": run.total_steps}
    record.update({k: v for k, v in result.items() if k != "workdir"})
    record["timing"] = clock.timing()
    built.logger.log(record)
    scores = ctx.last_scores.get("test")
    test_set = next((s for s in run.data.eval_sets if s.name == "test"), None)
    if scores is not None and test_set is not None:
        results = eval_lib.build_results(
            scores,
            label_names=run.info["label_names"],
            cfg=run.cfg,
            split=run.split,
            step=run.total_steps,
            checkpoint="latest",
            num_segments=len(test_set),
            data_dir=run.cfg.data.prep_dir,
            content_hash=run.info["content_hash"],
            workdir=run.workdir,
            untrained_classes=run.untrained,
        )
        # Where checkpoints_best/ stands (eval.py --best scores it); the scores
        # above are the last epoch's, never chosen on the test set.
        results["best_validation"] = result["best_validation"]
        results["train_seconds"] = round(seconds, 3)
        results["compile_seconds"] = round(clock.compile_seconds, 3)
        results["training_finished"] = True  # written after the "final" record
        eval_lib.write_run_results(run.workdir, results, scores)
        note = eval_lib.collapse_note(results["confusion_matrix"], run.info["label_names"])
        if note and run.warn:
            print(
                f"warning: {run.workdir}: on its test set the model {note}; "
                f"{eval_lib.COLLAPSE_HINT}",
                file=sys.stderr,
            )
    return result


def _oom_hint(e: Exception) -> TrainingError | None:
    text = str(e)
    if "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text:
        return TrainingError(
            "out of device memory: lower optim.batch_size or data.eval_batch_size, set "
            "train.on_device=off (stream batches instead of holding the split on the device), "
            "or free the device (XLA_PYTHON_CLIENT_MEM_FRACTION / XLA_PYTHON_CLIENT_PREALLOCATE="
            f"false). Original error: {text.splitlines()[0][:300]}"
        )
    return None
