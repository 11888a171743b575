"""Running an experiment: every planned run trained (or resumed) in order, the summary written;
and ``reproduce``, which reruns finished runs and checks them bit for bit.

For every group the teacher is trained with cross-entropy (``train_lib.train_and_evaluate``)
and each requested student is distilled from it. Training itself scores the last epoch on the
held-out utterances and writes ``results.json`` (``eval_lib``, the same scoring path as
``eval.py``), so nothing is evaluated twice. A run is *finished* when its ``results.json``
exists and records the same training config; rerunning the same command skips finished runs
and resumes the others (training resumes from its last checkpoint). Each run holds its
workdir's lock while it trains.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dkd_jax import config as config_lib
from dkd_jax import jsonio, protocols, provenance, records, run_dir
from dkd_jax.experiment import checks
from dkd_jax.experiment.report import (
    build_summary,
    format_summary_text,
    percent,
    runs_in_folder,
    validation_scores,
    with_earlier_runs,
    write_summary,
)
from dkd_jax.experiment.spec import (
    CACHE_DIR,
    EXPERIMENT_FILE,
    SUMMARY_JSON,
    SUMMARY_MD,
    ExperimentError,
    ExperimentSpec,
    RunPlan,
    is_finished,
    load_spec,
    plan_runs,
    run_config,
    run_mismatch,
)


def _enable_compilation_cache(cache_dir: Path) -> None:
    from dkd_jax import train_lib  # JAX only once something trains

    train_lib.enable_compilation_cache(cache_dir)


_PRINT_LOCK = threading.Lock()  # whole lines from concurrent groups (jobs > 1)


def _say(msg: str, *, quiet: bool = False) -> None:
    if not quiet:
        with _PRINT_LOCK:
            sys.stdout.write(msg + "\n")
            sys.stdout.flush()


def _load_or_write_spec(
    exp_dir: Path, spec: ExperimentSpec, content_hash: str | None, *, overwrite: bool
) -> None:
    """Records the settings; refuses (or, with ``overwrite``, wipes) an experiment with others.

    Folds, seeds and students may change between invocations (an experiment can be extended);
    the data, protocol and the runs' resolved configs may not. Settings are compared by what
    they make, not by how they were written: overrides in another order, or one that repeats a
    preset's value, are the same experiment, and so is a prep moved elsewhere with the same
    content hash.
    """
    path = exp_dir / EXPERIMENT_FILE
    if path.exists():
        try:
            old = load_spec(exp_dir)
        except ExperimentError as e:
            if not overwrite:
                raise ExperimentError(
                    f"{e}; fix it, use another --out, or --overwrite to delete its runs and "
                    "start over"
                ) from None
            changed = ["experiment.json"]
        else:
            changed = _spec_changes(exp_dir, old, spec, content_hash)
        if changed and not overwrite:
            raise ExperimentError(
                f"{exp_dir} holds an experiment with other settings ({'; '.join(changed)}); use "
                "another --out, or --overwrite to delete its runs and start over"
            )
        if changed:
            _refuse_if_running(exp_dir)
            for child in exp_dir.iterdir():
                if child.name not in (CACHE_DIR, run_dir.LOCK_FILE):  # the lock: this runner's
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
    jsonio.write_json(path, spec.to_dict())


def _spec_changes(
    exp_dir: Path, old: ExperimentSpec, new: ExperimentSpec, content_hash: str | None
) -> list[str]:
    """What differs between two experiments' settings, in words (empty: the same one)."""
    if old.protocol != new.protocol:
        return [f"protocol: {old.protocol!r} -> {new.protocol!r}"]
    out = []
    if old.data != new.data:
        trained_on = set()
        for key in runs_in_folder(exp_dir, old):
            with contextlib.suppress(run_dir.RunDirError, FileNotFoundError):
                trained_on.add(run_dir.load_split(exp_dir / key)[1].get("content_hash"))
        if not content_hash or trained_on != {content_hash}:  # moved: same content is fine
            out.append(f"data: {old.data!r} -> {new.data!r}")
    fold = new.folds[0] if new.folds else None
    seed = new.seeds[0]
    for model in dict.fromkeys(("teacher", *old.students, *new.students)):
        try:
            before = run_config(old, model, fold, seed, "")
        except (config_lib.ConfigError, ValueError) as e:  # e.g. a preset renamed since
            out.append(f"the recorded settings no longer make a config ({e})")
            break
        try:
            after = run_config(new, model, fold, seed, "")
        except (config_lib.ConfigError, ValueError) as e:  # new settings, an earlier student
            out.append(f"{model}: the new settings do not make its config ({e})")
            continue
        diffs = config_lib.diff(before, after)
        diffs.pop("data.prep_dir", None)
        if diffs:
            out.append(f"{model}: {run_dir.format_changes(diffs)}")
    return out


def _refuse_if_running(exp_dir: Path) -> None:
    """Before deleting an experiment's runs: none of them may be in use (a running `run`)."""
    for key in runs_in_folder(exp_dir, None):
        holder = run_dir.lock_holder(exp_dir / key)
        if holder:
            raise ExperimentError(
                f"{exp_dir / key}: in use by {run_dir.holder_text(holder)}; --overwrite deletes "
                "every run of the experiment: wait for it to finish or stop it first"
            )


def _replace_stale_runs(
    exp_dir: Path, plans: Sequence[RunPlan], metadata: dict[str, Any], *, overwrite: bool
) -> None:
    """Before anything trains: refuses (or, with ``overwrite``, deletes) every run directory,
    planned now or finished by an earlier invocation, whose training config is not the one
    this experiment plans for it or that trained on other data, though the recorded settings
    match (a preset that changed between versions of dkd-jax, a run edited by hand, a prep
    rebuilt at the same path): a summary would average it in with the others."""
    for plan in plans:
        workdir = exp_dir / plan.key
        why = run_mismatch(workdir, plan.config, metadata)
        if why is None:
            continue
        if not overwrite:
            raise ExperimentError(
                f"{workdir} holds a run {why}, not this experiment's {plan.model}; use another "
                "--out, or --overwrite to delete such runs and train them again"
            )
        holder = run_dir.lock_holder(workdir)
        if holder:
            raise ExperimentError(
                f"{workdir}: in use by {run_dir.holder_text(holder)}; wait for it to finish"
            )
        run_dir.clear_run(workdir)


def execute_run(
    plan: RunPlan,
    workdir: Path,
    *,
    teacher_workdir: Path | None,
    heartbeat_seconds: float = 0.0,
) -> dict[str, Any]:
    """Trains (or resumes) one run and returns its ``results.json`` (written by training)."""
    from dkd_jax import train_lib

    kwargs = {} if teacher_workdir is None else {"teacher_workdir": str(teacher_workdir)}
    with run_dir.locked(workdir, "the experiment runner"):
        train_lib.train_and_evaluate(
            plan.config,
            str(workdir),
            heartbeat_seconds=heartbeat_seconds,
            label=plan.key,
            data_warnings=False,  # said once per group (_group_checks)
            **kwargs,
        )
    results = run_dir.read_results(workdir)
    if results is None:
        raise ExperimentError(f"{workdir}: training finished without results.json")
    return results


def _clock(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class _Progress:
    """Per-run lines with the elapsed time and an ETA from the runs of the same kind (teacher,
    each student objective) trained so far in this invocation."""

    def __init__(self, plans: Sequence[RunPlan], quiet: bool, jobs: int = 1):
        self.lock = threading.Lock()  # concurrent groups (jobs > 1)
        self.jobs = max(1, jobs)
        self.left = {p.key: p.model for p in plans}
        self.seconds: dict[str, list[float]] = {}
        self.t0 = time.perf_counter()
        self.quiet = quiet

    def done(self, plan: RunPlan, text: str, seconds: float | None) -> None:
        with self.lock:
            self._done(plan, text, seconds)

    def _done(self, plan: RunPlan, text: str, seconds: float | None) -> None:
        self.left.pop(plan.key, None)
        if seconds is not None:
            self.seconds.setdefault(plan.model, []).append(seconds)
        elapsed = time.perf_counter() - self.t0
        eta = self.eta()
        tail = f"elapsed {_clock(elapsed)}"
        if self.left:
            tail += f", {len(self.left)} run(s) left" + (f", ETA {_clock(eta)}" if eta else "")
        _say(f"    {plan.key}: {text} [{tail}]", quiet=self.quiet)

    def eta(self) -> float | None:
        every = [s for v in self.seconds.values() for s in v]
        if not every:
            return None
        fallback = sum(every) / len(every)
        per_kind = {k: sum(v) / len(v) for k, v in self.seconds.items()}
        # Concurrent runs each took longer, but `jobs` of them go at once.
        return sum(per_kind.get(model, fallback) for model in self.left.values()) / self.jobs


def _run_line(results: dict[str, Any], seconds: float, *, validation_only: bool, workdir) -> str:
    if validation_only:
        val = validation_scores(workdir)
        return (
            f"validation WA {percent(val['val_wa'])} %  UA {percent(val['val_ua'])} %  "
            f"(train {seconds:.0f} s)"
        )
    missing = results.get("absent_classes") or []
    flag = f"; test set lacks {', '.join(missing)}" if missing else ""
    untrained = results.get("untrained_classes") or []
    flag += f"; trained without {', '.join(untrained)}" if untrained else ""
    compiled = results.get("compile_seconds")
    compiled = f", of which compiling {compiled:.0f} s" if compiled is not None else ""
    return (
        f"WA {100 * results['wa']:.1f} %  UA {100 * results['ua']:.1f} %  "
        f"({results['num_utterances']} test utterances{flag}; train {seconds:.0f} s{compiled})"
    )


def _check_splits(spec: ExperimentSpec, plans: Sequence[RunPlan], metadata: dict) -> None:
    """Every planned split can be made from the prep (loso of a one-session prep cannot): an
    error before anything is written, so that the natural fix (another --protocol) is not
    refused as "an experiment with other settings" by the spec a failed start left."""
    seen = set()
    for plan in plans:
        key = repr(config_lib.to_dict(plan.config)["data"])
        if key in seen:
            continue
        seen.add(key)
        try:
            protocols.split_for_run(metadata, plan.config.data)
        except ValueError as e:
            raise ExperimentError(f"{spec.data}: {e}") from None


def _group_checks(exp_dir, plan, spec, metadata, cache, *, baselines, validation_only, quiet):
    """The group's untrained classes, confound warning and baselines (before its deep models
    train)."""
    untrained = protocols.untrained_warning(
        metadata,
        protocols.split_for_run(metadata, plan.config.data),
        test_counts=not validation_only,  # choosing settings: nothing about the test set
    )
    if untrained:
        print(f"{plan.group}: {untrained}", file=sys.stderr, flush=True)
    checks.warn_confound(plan, checks.group_confound(plan, metadata))
    note = checks.held_out_note(plan, metadata)
    if note:
        print(f"{plan.group}, held-out speakers:\n{note}", file=sys.stderr, flush=True)
    if not baselines:
        return
    t0 = time.perf_counter()
    for model, res in checks.run_baselines(
        exp_dir, plan, spec.data, metadata, cache, validation_only=validation_only
    ).items():
        what = "validation" if validation_only else "test"
        _say(
            f"    {plan.group}/{model}: {what} WA {percent(res['wa'])} %  "
            f"UA {percent(res['ua'])} %  "
            f"(logistic regression on feature statistics, C {res['C']:g}; "
            f"{time.perf_counter() - t0:.0f} s)",
            quiet=quiet,
        )


def run_experiment(
    exp_dir: str | os.PathLike,
    spec: ExperimentSpec,
    *,
    overwrite: bool = False,
    progress: bool = True,
    quiet: bool = False,
    on_run: Callable[[RunPlan, str], None] | None = None,
    validation_only: bool = False,
    baselines: bool = True,
    heartbeat_seconds: float = 60.0,
    jobs: int = 1,
) -> dict[str, Any]:
    """Runs (or resumes) every run of an experiment, then writes and returns the summary.

    Per fold/seed group: the speaker–label confound check and the feature-statistics baselines
    (``checks``), then the teacher and each student. A line per finished run gives the elapsed
    time and an ETA; with ``progress``, a heartbeat line every ``heartbeat_seconds`` during a
    run when no progress bar can show (a log file).

    Args:
        exp_dir: experiment directory (created if missing).
        spec: the experiment (``make_spec``).
        overwrite: when ``exp_dir`` holds an experiment with other settings, delete its runs
            and start over; when a run directory holds a run with another training config
            than planned (a preset changed between versions), delete that run and train it
            again (without it, both are errors).
        progress: progress bars on a terminal, heartbeat lines elsewhere.
        quiet: print nothing (warnings still go to stderr).
        on_run: called with (plan, "skipped" | "trained") after each run (tests use it).
        validation_only: for choosing settings without looking at the held-out speakers: print
            only validation scores (the runs need ``data.validation`` != "none") and write no
            ``summary.json``/``summary.md`` (``summarize`` writes them once the choice is made).
        baselines: fit the feature-statistics baselines (``--no-baseline`` turns them off).
        heartbeat_seconds: interval of the heartbeat lines.
        jobs: fold/seed groups trained at the same time, on threads of this process (results
            are bit-identical to ``jobs=1``; on a 2-core CPU 2 jobs finish ~15 % sooner, on a
            GPU they share the device). Progress bars are replaced by heartbeat lines.

    Returns:
        The summary dict (also in ``summary.json`` unless ``validation_only``).
    """
    exp_dir = Path(exp_dir)
    if jobs < 1:
        raise ExperimentError(f"jobs must be >= 1, got {jobs}")
    plans = plan_runs(spec, exp_dir)  # validates every run's config before anything is written
    if validation_only:
        _require_validation(plans)
    if exp_dir.exists() and not exp_dir.is_dir():
        raise ExperimentError(f"--out {exp_dir}: a file, not an experiment directory")
    exp_dir.mkdir(parents=True, exist_ok=True)
    options = {
        "overwrite": overwrite,
        "progress": progress,
        "quiet": quiet,
        "on_run": on_run,
        "validation_only": validation_only,
        "baselines": baselines,
        "heartbeat_seconds": heartbeat_seconds,
        "jobs": jobs,
    }
    # One runner per experiment folder, for the whole invocation: another one's --overwrite
    # must not delete it between two runs (each run also holds its own folder's lock).
    with run_dir.locked(exp_dir, "the experiment runner"):
        return _run_locked(exp_dir, spec, plans, **options)


def _run_locked(exp_dir: Path, spec: ExperimentSpec, plans: Sequence[RunPlan], *, overwrite,
                progress, quiet, on_run, validation_only, baselines, heartbeat_seconds,
                jobs) -> dict[str, Any]:  # fmt: skip
    """:func:`run_experiment` once it holds the experiment folder's lock."""
    metadata = records.load_metadata(spec.data)
    _check_splits(spec, plans, metadata)  # before experiment.json: a refusal leaves no spec
    content_hash = metadata.get("content_hash")
    _load_or_write_spec(exp_dir, spec, content_hash, overwrite=overwrite)
    _enable_compilation_cache(exp_dir / CACHE_DIR)
    everything, _ = with_earlier_runs(exp_dir, spec, plans)  # earlier invocations' runs too
    _replace_stale_runs(exp_dir, everything, metadata, overwrite=overwrite)
    groups = list(dict.fromkeys(p.group for p in plans))
    left = [p for p in plans if not is_finished(exp_dir / p.key, p.config)]
    tracker = _Progress(left, quiet, jobs=min(jobs, len(groups)))
    # Bars of concurrent runs would overwrite each other: heartbeats instead.
    bars = progress and jobs == 1
    beat = (
        heartbeat_seconds if progress and not quiet and not (bars and sys.stderr.isatty()) else 0.0
    )
    cache: dict[str, Any] = {}
    if baselines:  # the prep's statistics, once, before any group needs them
        from dkd_jax import baseline

        cache["stats"] = baseline.utterance_statistics(spec.data)
    options = {
        "exp_dir": exp_dir,
        "spec": spec,
        "metadata": metadata,
        "cache": cache,
        "baselines": baselines,
        "validation_only": validation_only,
        "quiet": quiet,
        "bars": bars,
        "beat": beat,
        "tracker": tracker,
        "on_run": on_run,
    }
    work = [
        (gi, group, [p for p in plans if p.group == group]) for gi, group in enumerate(groups, 1)
    ]
    if jobs > 1 and len(groups) > 1:
        _run_concurrently(work, jobs, options)
    else:
        for gi, group, mine in work:
            _run_group(gi, len(groups), group, mine, **options)
    make = build_summary if validation_only else write_summary
    summary = make(exp_dir, spec=spec, plans=plans)
    summary["wall_seconds"] = round(time.perf_counter() - tracker.t0, 1)
    _say("", quiet=quiet)
    _say(format_summary_text(summary, validation_only=validation_only), quiet=quiet)
    if not validation_only:
        _say(f"\nsummary: {exp_dir / SUMMARY_MD}  (and {SUMMARY_JSON})", quiet=quiet)
    return summary


def _run_group(gi, num_groups, group, mine, *, exp_dir, spec, metadata, cache, baselines,
               validation_only, quiet, bars, beat, tracker, on_run) -> None:  # fmt: skip
    """One fold/seed group: its checks and baseline, then the teacher and each student."""
    _say(f"  {group} (group {gi} of {num_groups})", quiet=quiet)
    _group_checks(
        exp_dir,
        mine[0],
        spec,
        metadata,
        cache,
        baselines=baselines,
        validation_only=validation_only,
        quiet=quiet,
    )
    for plan in mine:
        workdir = exp_dir / plan.key
        teacher = exp_dir / plan.teacher_key if plan.teacher_key else None
        plan.config.train.progress = bars
        if is_finished(workdir, plan.config):
            tracker.done(plan, "finished earlier, skipped", None)
            status = "skipped"
        else:
            t0 = time.perf_counter()
            results = execute_run(
                plan,
                workdir,
                teacher_workdir=teacher,
                heartbeat_seconds=beat,
            )
            seconds = time.perf_counter() - t0
            line = _run_line(results, seconds, validation_only=validation_only, workdir=workdir)
            tracker.done(plan, line, seconds)
            status = "trained"
        if on_run is not None:
            on_run(plan, status)


def _run_concurrently(work: list, jobs: int, options: dict) -> None:
    """Groups on ``jobs`` threads of this process. XLA:CPU executes each computation on its
    fixed intra-op thread pool whatever else runs, so every number equals a one-at-a-time run
    bit for bit, and the runs share their compiled functions. On a failure the other running
    groups finish their current run first; groups not started are not started. On Ctrl-C it
    returns at once, without waiting for the running groups (the command line then exits, and
    the same command resumes them from their last checkpoints)."""
    import concurrent.futures

    pool = concurrent.futures.ThreadPoolExecutor(jobs, thread_name_prefix="group")
    futures = [pool.submit(_run_group, gi, len(work), g, m, **options) for gi, g, m in work]
    interrupted = False
    try:
        for future in concurrent.futures.as_completed(futures):
            future.result()
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        pool.shutdown(wait=not interrupted, cancel_futures=True)


def _require_validation(plans: Sequence[RunPlan]) -> None:
    if any(p.config.data.validation == "none" for p in plans):
        raise ExperimentError(
            "--validation-only needs a validation hold-out inside the training speakers: add "
            "--config.data.validation=speaker (and e.g. --config.data.validation_fraction=0.25)"
        )


_TIMING_WORDS = ("time", "timing", "second", "per_s", "wall", "throughput", "date")


def _is_timing(key: str) -> bool:
    k = key.lower()
    return any(w in k for w in _TIMING_WORDS) or k.endswith("_s")


def _drop_timings(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _drop_timings(v) for k, v in obj.items() if not _is_timing(str(k))}
    if isinstance(obj, list):
        return [_drop_timings(v) for v in obj]
    return obj


def _metrics_records(workdir: Path) -> list[dict[str, Any]]:
    """``metrics.jsonl`` records without wall-clock fields (which never reproduce)."""
    return [_drop_timings(rec) for rec in run_dir.read_metrics(workdir)]


def _environment_note(changes: list[str]) -> str:
    """Why a rerun may differ: what changed since the run was trained, or that nothing did."""
    if not changes:
        return (
            "      the same packages, device, CPU and commit as the run: a difference here is "
            "nondeterminism, worth reporting"
        )
    lines = ["      trained in another environment (bit-identity needs the same one):"]
    lines += [f"        {c}" for c in changes]
    if any(c.startswith("CPU ") for c in changes):
        lines.append(
            "        XLA compiles for the processor it runs on (on CPU, for the CPU model): "
            "runs repeat bit for bit on one CPU model, not across models (README: Results)"
        )
    return "\n".join(lines)


def compare_runs(original: str | os.PathLike, rerun: str | os.PathLike) -> dict[str, Any]:
    """Compares two finished runs bit for bit.

    Checks the results (WA, UA, confusion matrix, per-class scores, evaluated step, and every
    utterance's mean logits in ``utterance_scores.csv``), every non-timing value of
    ``metrics.jsonl``, and every leaf of the restored variables (params and batch statistics:
    same shape, dtype and bytes).

    Also lists what differs between the two runs' environments (``results.json``'s provenance:
    package versions, device, CPU, git commit; ``provenance.environment_differences``), which
    does not count against a match but explains a mismatch.

    Returns:
        {"match": bool, "results": bool, "metrics": bool, "params": bool, "differences": [...],
        "environment": [...]}
    """
    original, rerun = Path(original), Path(rerun)
    diffs: list[str] = []
    ra = run_dir.read_results(original) or {}
    rb = run_dir.read_results(rerun) or {}
    keys = ("wa", "ua", "confusion_matrix", "per_class", "num_utterances", "num_segments", "step")
    res_ok = True
    for k in keys:
        if ra.get(k) != rb.get(k):
            res_ok = False
            diffs.append(f"results.{k}: {ra.get(k)!r} != {rb.get(k)!r}")
    sa, sb = (d / run_dir.SCORES_FILE for d in (original, rerun))
    if sa.exists() and sb.exists() and sa.read_bytes() != sb.read_bytes():
        res_ok = False
        diffs.append(f"{run_dir.SCORES_FILE}: per-utterance scores differ")
    ma, mb = _metrics_records(original), _metrics_records(rerun)
    met_ok = ma == mb
    if not met_ok:
        if len(ma) != len(mb):
            diffs.append(f"metrics.jsonl: {len(ma)} records != {len(mb)} records")
        for i, (a, b) in enumerate(zip(ma, mb, strict=False)):
            if a != b:
                bad = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                diffs.append(f"metrics.jsonl record {i}: {bad[:6]} differ")
                break
    va = run_dir.restore_run(original).variables
    vb = run_dir.restore_run(rerun).variables
    par_ok = True
    import jax

    flat_a = jax.tree_util.tree_flatten_with_path(va)[0]
    flat_b = dict(jax.tree_util.tree_flatten_with_path(vb)[0])
    if len(flat_a) != len(flat_b):
        par_ok = False
        diffs.append(f"variables: {len(flat_a)} leaves != {len(flat_b)} leaves")
    for path, leaf in flat_a:
        other = flat_b.get(path)
        a = np.asarray(leaf)
        b = None if other is None else np.asarray(other)
        if b is None or a.shape != b.shape or a.dtype != b.dtype or a.tobytes() != b.tobytes():
            par_ok = False
            diffs.append(f"variables{jax.tree_util.keystr(path)} differ")
            if len(diffs) > 20:
                break
    return {
        "match": res_ok and met_ok and par_ok,
        "results": res_ok,
        "metrics": met_ok,
        "params": par_ok,
        "differences": diffs,
        "environment": provenance.environment_differences(
            ra.get("provenance") or {}, rb.get("provenance") or {}
        ),
    }


SCRATCH_MARKER = ".reproduce-scratch"
"""Written into a reproduce scratch folder first: only such a folder (or an empty one, or an
older one holding ``reproduce.json``) is emptied by the next ``reproduce``."""


def _empty_scratch(scratch: Path) -> None:
    """Creates ``scratch`` (marked), emptying an earlier reproduce folder there; refuses any
    other non-empty folder or a file: ``--scratch`` must never delete a user's data."""
    if scratch.exists() and not scratch.is_dir():
        raise ExperimentError(f"--scratch {scratch}: not a directory")
    if scratch.is_dir():
        names = sorted(p.name for p in scratch.iterdir())
        ours = SCRATCH_MARKER in names or "reproduce.json" in names
        if names and not ours:
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            raise ExperimentError(
                f"--scratch {scratch}: not empty ({shown}) and not an earlier reproduce folder; "
                "give a new or empty folder"
            )
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    (scratch / SCRATCH_MARKER).write_text("reruns of python -m dkd_jax.experiment reproduce\n")


def reproduce(
    exp_dir: str | os.PathLike,
    *,
    fold: int | None = None,
    model: str | None = None,
    scratch: str | os.PathLike | None = None,
    data: str | os.PathLike | None = None,
    progress: bool = True,
    quiet: bool = False,
) -> dict[str, Any]:
    """Reruns finished runs of an experiment into a scratch dir and compares them bit for bit.

    Args:
        exp_dir: a finished (or partly finished) experiment.
        fold: restrict to one group: the loso fold index, or the paper seed.
        model: restrict to one model ("teacher" or a student objective). A student alone is
            distilled from the *original* teacher; when the teacher is rerun too, the rerun
            students distil from the rerun teacher (the whole chain is checked).
        scratch: where the reruns go (default ``EXP/reproduce``). It must be new, empty, or
            an earlier reproduce folder (which is emptied first); anything else is refused.
        data: the prep to rerun on (default the experiment's, ``experiment.json``), e.g. where
            it moved since; refused unless it holds what each run trained on (content hash).
        progress: progress bars.
        quiet: print nothing.

    Returns:
        {"match": bool, "runs": {run key: compare_runs(...)}}; also written to
        ``<scratch>/reproduce.json``.
    """
    exp_dir = Path(exp_dir)
    spec = load_spec(exp_dir)
    # Every finished run, earlier invocations' included (experiment.json holds the last one's
    # folds, seeds and students): what summarize counts is what is reproduced.
    plans, _ = with_earlier_runs(exp_dir, spec, plan_runs(spec, exp_dir))
    if fold is not None:
        plans = [p for p in plans if (p.fold if spec.protocol == "loso" else p.seed) == fold]
    if model is not None:
        plans = [p for p in plans if p.model == model]
    plans = [p for p in plans if (exp_dir / p.key / run_dir.RESULTS_FILE).exists()]
    if not plans:
        raise ExperimentError(
            f"{exp_dir}: no finished run matches fold={fold} model={model} (finished runs have a "
            "results.json)"
        )
    prep = str(Path(data).resolve()) if data is not None else spec.data
    if not Path(prep).is_dir():
        raise ExperimentError(
            f"{exp_dir}: its prep dir {prep} is not there (moved?); pass --data with where it is"
        )
    metadata = records.load_metadata(prep)
    rerun_plans = []
    for plan in plans:  # rerun exactly what ran: the run's own resolved config.json
        try:
            cfg = run_dir.load_config(exp_dir / plan.key)
            run_dir.load_results(exp_dir / plan.key)  # what the rerun is compared with
        except run_dir.RunDirError as e:
            raise ExperimentError(f"cannot reproduce {plan.key}: {e}") from None
        cfg.data.prep_dir = prep  # the experiment's prep, where it is now
        # Other data, or a split the protocol no longer makes (the paper protocol's runs made
        # before it kept improvised dialogs only): a rerun could only differ, said up front.
        why = run_mismatch(exp_dir / plan.key, cfg, metadata)
        if why:
            hint = "; pass --data with the prep it trained on" if "other data" in why else ""
            raise ExperimentError(f"cannot reproduce {plan.key}: a run {why}{hint}")
        rerun_plans.append(dataclasses.replace(plan, config=cfg))
    plans = rerun_plans
    scratch = Path(scratch) if scratch is not None else exp_dir / "reproduce"
    _empty_scratch(scratch)
    _enable_compilation_cache(exp_dir / CACHE_DIR)
    rerun_keys = {p.key for p in plans}
    report: dict[str, Any] = {"runs": {}}
    for plan in plans:
        teacher = None
        if plan.teacher_key is not None:
            teacher = (scratch if plan.teacher_key in rerun_keys else exp_dir) / plan.teacher_key
        _say(f"reproducing {plan.key} -> {scratch / plan.key}", quiet=quiet)
        plan.config.train.progress = progress
        execute_run(plan, scratch / plan.key, teacher_workdir=teacher)
        cmp = compare_runs(exp_dir / plan.key, scratch / plan.key)
        report["runs"][plan.key] = cmp
        verdict = "MATCH (bit for bit)" if cmp["match"] else "DIFFERENT"
        _say(f"    {plan.key}: {verdict}", quiet=quiet)
        for d in cmp["differences"][:10]:
            _say(f"      {d}", quiet=quiet)
        if not cmp["match"]:
            _say(_environment_note(cmp["environment"]), quiet=quiet)
    report["match"] = all(r["match"] for r in report["runs"].values())
    report["provenance"] = provenance.provenance()
    jsonio.write_json(scratch / "reproduce.json", report)
    _say(
        f"reproduce: {'all runs match bit for bit' if report['match'] else 'MISMATCH'} "
        f"({len(plans)} run(s); report {scratch / 'reproduce.json'})",
        quiet=quiet,
    )
    return report
