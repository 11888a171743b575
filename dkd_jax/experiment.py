"""Experiment runner: a whole protocol (folds/seeds × teacher + students) in one command.

Owns the layout of an experiment directory and everything needed to fill and summarise it::

    EXP/experiment.json          the experiment's settings (data, protocol, presets, overrides)
    EXP/<group>/teacher/         one training workdir per run (config.json, split.json,
    EXP/<group>/student_dkd/       metrics.jsonl, checkpoints/, results.json, confusion.png)
    EXP/summary.json, summary.md mean ± std of WA/UA per model, the per-run table
    EXP/.jax_cache/              persistent XLA compilation cache shared by all runs

``<group>`` is ``fold<k>-seed<s>`` for ``loso`` (fold k holds out the k-th session; the seed is
the training seed) and ``seed<s>`` for ``paper`` (the seed draws the 80/20 split *and* seeds
training, as in the lineage code).

For every group the teacher is trained with cross-entropy (``train_lib.train_and_evaluate``),
each requested student is distilled from it, and every run is scored on its held-out utterances
(``eval_lib.evaluate_run``). A run is *finished* when its ``results.json`` exists and records the
same training config; re-running the same command skips finished runs and resumes the others
(training itself resumes from its last checkpoint).

Headline numbers are last-epoch scores. The lineage's "best epoch on the test set" numbers (max
over epochs of the test WA and, independently, of the test UA, read from ``metrics.jsonl``) are
reported in a separate, clearly labelled column: they select the epoch on the test set and are
optimistic.

``reproduce`` reruns finished runs into a scratch directory and reports whether the metrics
(results and every ``metrics.jsonl`` value that is not a timing) and the trained parameters match
bit for bit.

Command line (``python -m dkd_jax.experiment --help``)::

    python -m dkd_jax.experiment run --data PREP --out EXP --protocol loso [--folds 0,1]
        [--seeds 0] [--preset demo] [--students dkd,ce] [--teacher-preset P] [--config.x.y=v]
    python -m dkd_jax.experiment summarize EXP [--validation-only]
    python -m dkd_jax.experiment reproduce EXP [--fold K] [--model dkd] [--scratch DIR]

Choosing settings without looking at the held-out speakers (inner cross-validation): run the
candidates with a validation hold-out carved from the *training* speakers and
``--validation-only``, which prints only validation scores and writes no summary::

    python -m dkd_jax.experiment run ... --validation-only \
        --config.data.validation=speaker --config.data.validation_fraction=0.25

When runs have a validation hold-out, ``summary.md`` also reports their validation WA/UA.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dkd_jax import config as config_lib
from dkd_jax import eval_lib, protocols, records

EXPERIMENT_FILE = "experiment.json"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
CACHE_DIR = ".jax_cache"
PAPER_SEEDS = (111111, 123456, 0, 999999, 987654)
STUDENT_LOSSES = ("dkd", "ce", "kd", "tckd", "nckd")
MODEL_LABELS = {
    "teacher": "teacher (CE)",
    "dkd": "student DKD",
    "ce": "student CE",
    "kd": "student KD",
    "tckd": "student TCKD",
    "nckd": "student NCKD",
}
# Fields the runner sets itself for every run; overriding them would break the layout.
_RUNNER_FIELDS = (
    "data.prep_dir",
    "data.protocol",
    "data.fold",
    "data.split_seed",
    "train.seed",
    "model.role",
    "kd.loss",
)
# Fields that do not change what a run computes (ignored when deciding whether it is finished).
_VOLATILE_FIELDS = ("data.prep_dir", "train.progress", "train.compilation_cache_dir")


class ExperimentError(ValueError):
    """An experiment that cannot be run or summarised as asked (the message says why)."""


# --------------------------------------------------------------------------------------------
# Settings and plan
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ExperimentSpec:
    """What an experiment runs (saved as ``experiment.json``).

    Attributes:
        data: prep directory (absolute path).
        protocol: "loso" or "paper".
        folds: loso folds to run (indices into the sorted session list); ignored for "paper".
        seeds: loso: training seeds per fold; paper: split + training seeds.
        preset: config preset of the students (and of the teacher unless ``teacher_preset``).
        teacher_preset: config preset of the teacher ("" = ``preset``).
        students: student objectives, a subset of STUDENT_LOSSES, in display order.
        overrides: ``group.field=value`` config overrides applied to every run.
    """

    data: str
    protocol: str
    folds: tuple[int, ...]
    seeds: tuple[int, ...]
    preset: str = "default"
    teacher_preset: str = ""
    students: tuple[str, ...] = ("dkd",)
    overrides: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExperimentSpec:
        """Inverse of :meth:`to_dict`."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """One training run of an experiment.

    Attributes:
        group: "fold<k>-seed<s>" (loso) or "seed<s>" (paper).
        model: "teacher" or a student objective.
        fold: loso fold index (None for paper).
        seed: training seed (and split seed for paper).
        config: the resolved training config.
    """

    group: str
    model: str
    fold: int | None
    seed: int
    config: config_lib.Config

    @property
    def key(self) -> str:
        """Path of the run relative to the experiment dir."""
        return f"{self.group}/{run_dir_name(self.model)}"

    @property
    def teacher_key(self) -> str | None:
        return None if self.model == "teacher" else f"{self.group}/{run_dir_name('teacher')}"


def run_dir_name(model: str) -> str:
    """Directory name of a model's run inside its group ("teacher", "student_dkd", ...)."""
    return "teacher" if model == "teacher" else f"student_{model}"


def _parse_ints(text: str | None, what: str) -> tuple[int, ...] | None:
    if text is None or text == "":
        return None
    out = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part[1:]:  # a range "0-4"
            lo, hi = part.split("-", 1)
            try:
                out.extend(range(int(lo), int(hi) + 1))
            except ValueError:
                raise ExperimentError(f"bad {what} {text!r}: {part!r} is not a range") from None
            continue
        try:
            out.append(int(part))
        except ValueError:
            raise ExperimentError(f"bad {what} {text!r}: {part!r} is not an integer") from None
    if len(set(out)) != len(out):
        raise ExperimentError(f"bad {what} {text!r}: repeated values")
    return tuple(out)


def make_spec(
    *,
    data: str | os.PathLike,
    protocol: str,
    folds: Sequence[int] | None = None,
    seeds: Sequence[int] | None = None,
    preset: str = "default",
    teacher_preset: str = "",
    students: Sequence[str] = ("dkd",),
    overrides: Sequence[str] = (),
) -> ExperimentSpec:
    """Validates the settings of an experiment and fills in defaults.

    Defaults: ``loso`` runs every fold (one per session) with the preset's training seed;
    ``paper`` runs the lineage seeds 111111, 123456, 0, 999999, 987654.

    Raises:
        ExperimentError: unknown protocol/preset/student, bad fold, runner-owned overrides.
        records.DataError: the prep dir cannot be read.
    """
    data = str(Path(data).resolve())
    metadata = records.load_metadata(data)
    if protocol not in ("loso", "paper"):
        raise ExperimentError(f"unknown protocol {protocol!r}; choose loso or paper")
    for name in (preset, teacher_preset or preset):
        if name not in config_lib.PRESETS:
            raise ExperimentError(f"unknown preset {name!r}; known: {sorted(config_lib.PRESETS)}")
    students = tuple(students)
    bad = [s for s in students if s not in STUDENT_LOSSES]
    if bad or len(set(students)) != len(students):
        raise ExperimentError(
            f"bad --students {','.join(students)!r}: choose distinct names from "
            f"{', '.join(STUDENT_LOSSES)}"
        )
    # canonical "group.field=value" (the CLI passes "--config.group.field=value")
    overrides = tuple(o.strip().lstrip("-").removeprefix("config.") for o in overrides)
    for item in overrides:
        path = item.split("=", 1)[0].strip()
        if path in _RUNNER_FIELDS:
            raise ExperimentError(
                f"override {item!r}: the runner sets {path} itself (use --data, --protocol, "
                "--folds, --seeds, --students)"
            )
    # Validate the overrides once, with a clear message, before any run starts.
    try:
        config_lib.apply_overrides(config_lib.get_config(preset), overrides)
    except config_lib.ConfigError as e:
        raise ExperimentError(str(e)) from None
    if protocol == "loso":
        num = protocols.num_folds(metadata, "loso")
        folds = tuple(range(num)) if folds is None else tuple(folds)
        out_of_range = [f for f in folds if not 0 <= f < num]
        if out_of_range or not folds:
            names = protocols.sessions(metadata)
            raise ExperimentError(
                f"loso folds {list(folds)} invalid: the data has {num} sessions {names} "
                f"(folds 0..{num - 1})"
            )
        if seeds is None:
            seeds = (config_lib.get_config(preset).train.seed,)
    else:
        if folds:
            raise ExperimentError("--folds applies to loso; the paper protocol uses --seeds")
        folds = ()
        seeds = PAPER_SEEDS if seeds is None else tuple(seeds)
    if not seeds or any(s < 0 for s in seeds):
        raise ExperimentError(f"seeds must be non-negative integers, got {list(seeds)}")
    return ExperimentSpec(
        data=data,
        protocol=protocol,
        folds=tuple(int(f) for f in folds),
        seeds=tuple(int(s) for s in seeds),
        preset=preset,
        teacher_preset=teacher_preset,
        students=students,
        overrides=tuple(overrides),
    )


def _run_config(
    spec: ExperimentSpec, model: str, fold: int | None, seed: int, cache_dir: str
) -> config_lib.Config:
    preset = (spec.teacher_preset or spec.preset) if model == "teacher" else spec.preset
    cfg = config_lib.apply_overrides(config_lib.get_config(preset), spec.overrides)
    cfg.data.prep_dir = spec.data
    cfg.data.protocol = spec.protocol
    if spec.protocol == "loso":
        cfg.data.fold = int(fold)
    else:
        cfg.data.split_seed = int(seed)
    cfg.train.seed = int(seed)
    cfg.train.compilation_cache_dir = cache_dir
    cfg.model.role = "teacher" if model == "teacher" else "student"
    if model != "teacher":
        cfg.kd.loss = model
    return cfg.validate()


def plan_runs(spec: ExperimentSpec, exp_dir: str | os.PathLike) -> list[RunPlan]:
    """All runs of an experiment in execution order (per group: teacher, then students)."""
    cache_dir = str(Path(exp_dir).resolve() / CACHE_DIR)
    groups: list[tuple[str, int | None, int]] = []
    if spec.protocol == "loso":
        groups = [(f"fold{f}-seed{s}", f, s) for f in spec.folds for s in spec.seeds]
    else:
        groups = [(f"seed{s}", None, s) for s in spec.seeds]
    plans = []
    for group, fold, seed in groups:
        for model in ("teacher", *spec.students):
            cfg = _run_config(spec, model, fold, seed, cache_dir)
            plans.append(RunPlan(group=group, model=model, fold=fold, seed=seed, config=cfg))
    return plans


def _comparable(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    d = json.loads(json.dumps(cfg_dict))
    for path in _VOLATILE_FIELDS:
        group, field = path.split(".")
        d.get(group, {}).pop(field, None)
    return d


def is_finished(workdir: str | os.PathLike, cfg: config_lib.Config) -> bool:
    """True when ``workdir`` holds a ``results.json`` evaluated for this same training config."""
    path = Path(workdir) / eval_lib.RESULTS_FILE
    if not path.exists():
        return False
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    stored = results.get("config")
    if not isinstance(stored, dict):
        return False
    try:  # through the current schema: fields added since take their defaults
        stored = config_lib.to_dict(config_lib.from_dict(stored))
    except config_lib.ConfigError:  # a field that no longer exists: not this config
        return False
    return _comparable(stored) == _comparable(config_lib.to_dict(cfg))


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def enable_compilation_cache(cache_dir: str | os.PathLike) -> None:
    """Turns on JAX's persistent compilation cache in ``cache_dir`` (every compile is cached)."""
    import jax

    path = Path(cache_dir)
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _say(msg: str, *, quiet: bool = False) -> None:
    if not quiet:
        print(msg, flush=True)


def _load_or_write_spec(exp_dir: Path, spec: ExperimentSpec, *, overwrite: bool) -> None:
    """Records the settings; refuses (or, with ``overwrite``, wipes) an experiment with others.

    Folds, seeds and students may change between invocations (an experiment can be extended);
    the data, protocol, presets and overrides may not.
    """
    path = exp_dir / EXPERIMENT_FILE
    if path.exists():
        old = ExperimentSpec.from_dict(json.loads(path.read_text()))
        fixed = ("data", "protocol", "preset", "teacher_preset", "overrides")
        changed = [k for k in fixed if getattr(old, k) != getattr(spec, k)]
        if changed and not overwrite:
            detail = "; ".join(f"{k}: {getattr(old, k)!r} -> {getattr(spec, k)!r}" for k in changed)
            raise ExperimentError(
                f"{exp_dir} holds an experiment with other settings ({detail}); use another "
                "--out, or --overwrite to delete its runs and start over"
            )
        if changed:
            for child in exp_dir.iterdir():
                if child.name != CACHE_DIR:
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
    eval_lib.write_json(path, spec.to_dict())


def train_run(plan: RunPlan, workdir: Path, *, teacher_workdir: Path | None) -> None:
    """Trains (or resumes) one run with ``train_lib.train_and_evaluate``."""
    from dkd_jax import train_lib

    kwargs = {} if teacher_workdir is None else {"teacher_workdir": str(teacher_workdir)}
    train_lib.train_and_evaluate(plan.config, str(workdir), **kwargs)


def execute_run(
    plan: RunPlan,
    workdir: Path,
    *,
    teacher_workdir: Path | None,
    quiet: bool = False,
    validation_only: bool = False,
) -> dict[str, Any]:
    """Trains one run, evaluates it, and returns its results.

    With ``validation_only`` the printed line shows the run's validation scores instead of its
    test scores (the test scores are still written to ``results.json``).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train_run(plan, workdir, teacher_workdir=teacher_workdir)
    t1 = time.perf_counter()
    results = eval_lib.evaluate_run(workdir, verbose=False)
    results["train_seconds"] = round(t1 - t0, 3)
    eval_lib.write_json(workdir / eval_lib.RESULTS_FILE, results)
    if validation_only:
        val = validation_scores(workdir)
        _say(
            f"    {plan.key}: validation WA {_pct(val['val_wa'])} %  UA {_pct(val['val_ua'])} %  "
            f"(train {t1 - t0:.0f} s)",
            quiet=quiet,
        )
    else:
        _say(
            f"    {plan.key}: WA {100 * results['wa']:.1f} %  UA {100 * results['ua']:.1f} %  "
            f"({results['num_utterances']} test utterances; train {t1 - t0:.0f} s)",
            quiet=quiet,
        )
    return results


def run_experiment(
    exp_dir: str | os.PathLike,
    spec: ExperimentSpec,
    *,
    overwrite: bool = False,
    progress: bool = True,
    quiet: bool = False,
    on_run: Callable[[RunPlan, str], None] | None = None,
    validation_only: bool = False,
) -> dict[str, Any]:
    """Runs (or resumes) every run of an experiment, then writes and returns the summary.

    Args:
        exp_dir: experiment directory (created if missing).
        spec: the experiment (``make_spec``).
        overwrite: when ``exp_dir`` holds an experiment with other settings, delete its runs
            and start over (without it, that is an error).
        progress: show per-epoch progress bars (also needs a terminal).
        quiet: print nothing.
        on_run: called with (plan, "skipped" | "trained") after each run (tests use it).
        validation_only: for choosing settings without looking at the held-out speakers: print
            only validation scores (the runs need ``data.validation`` != "none") and write no
            ``summary.json``/``summary.md`` (``summarize`` writes them once the choice is made).

    Returns:
        The summary dict (also in ``summary.json`` unless ``validation_only``).
    """
    exp_dir = Path(exp_dir)
    if validation_only:
        _require_validation(plan_runs(spec, exp_dir))
    exp_dir.mkdir(parents=True, exist_ok=True)
    _load_or_write_spec(exp_dir, spec, overwrite=overwrite)
    enable_compilation_cache(exp_dir / CACHE_DIR)
    plans = plan_runs(spec, exp_dir)
    groups = list(dict.fromkeys(p.group for p in plans))
    t_start = time.perf_counter()
    for gi, group in enumerate(groups, 1):
        _say(f"  {group} (group {gi} of {len(groups)})", quiet=quiet)
        for plan in (p for p in plans if p.group == group):
            workdir = exp_dir / plan.key
            teacher = exp_dir / plan.teacher_key if plan.teacher_key else None
            plan.config.train.progress = progress
            if is_finished(workdir, plan.config):
                _say(f"    {plan.key}: finished earlier, skipped", quiet=quiet)
                status = "skipped"
            else:
                execute_run(
                    plan,
                    workdir,
                    teacher_workdir=teacher,
                    quiet=quiet,
                    validation_only=validation_only,
                )
                status = "trained"
            if on_run is not None:
                on_run(plan, status)
    make = build_summary if validation_only else write_summary
    summary = make(exp_dir, spec=spec, plans=plans)
    summary["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    _say("", quiet=quiet)
    _say(format_summary_text(summary, validation_only=validation_only), quiet=quiet)
    if not validation_only:
        _say(f"\nsummary: {exp_dir / SUMMARY_MD}  (and {SUMMARY_JSON})", quiet=quiet)
    return summary


def _require_validation(plans: Sequence[RunPlan]) -> None:
    if any(p.config.data.validation == "none" for p in plans):
        raise ExperimentError(
            "--validation-only needs a validation hold-out inside the training speakers: add "
            "--config.data.validation=speaker (and e.g. --config.data.validation_fraction=0.25)"
        )


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------


def best_epoch_scores(workdir: str | os.PathLike) -> dict[str, float | None]:
    """The lineage's optimistic numbers: max over evaluations of test WA and of test UA.

    Reads the test evaluations of ``metrics.jsonl`` (``{"event": "eval", "split": "test", "wa",
    "ua", ...}``, one per evaluated epoch, written by ``train_lib``); the two maxima are taken
    independently, as the head-fusion code does, so they may come from different epochs.

    Returns:
        {"best_wa", "best_ua", "num_evals"}; the maxima are None when the run logged no test
        evaluations.
    """
    wa, ua = [], []
    for rec in _read_metrics(workdir):
        w, u = _eval_wa_ua(rec, "test")
        if w is not None:
            wa.append(w)
        if u is not None:
            ua.append(u)
    return {
        "best_wa": max(wa) if wa else None,
        "best_ua": max(ua) if ua else None,
        "num_evals": max(len(wa), len(ua)),
    }


def validation_scores(workdir: str | os.PathLike) -> dict[str, float | None]:
    """The run's last validation evaluation (``{"event": "eval", "split": "validation"}`` in
    ``metrics.jsonl``; the last epoch is always evaluated): {"val_wa", "val_ua"}, both None when
    the run has no validation hold-out. Never reads a test score."""
    out: dict[str, float | None] = {"val_wa": None, "val_ua": None}
    for rec in _read_metrics(workdir):
        w, u = _eval_wa_ua(rec, "validation")
        if w is not None or u is not None:
            out = {"val_wa": w, "val_ua": u}
    return out


def _read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """The parseable records of a run's ``metrics.jsonl`` ([] when missing); a line cut by a
    killed run is skipped."""
    path = Path(workdir) / "metrics.jsonl"
    records_ = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records_.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records_


def _eval_wa_ua(rec: dict[str, Any], split: str) -> tuple[float | None, float | None]:
    """(WA, UA) of a ``metrics.jsonl`` evaluation record of ``split``, else (None, None)."""
    if rec.get("event") != "eval" or rec.get("split") != split:
        return None, None

    def get(key):
        v = rec.get(key)
        return float(v) if isinstance(v, int | float) and math.isfinite(v) else None

    return get("wa"), get("ua")


def _mean_std(values: Sequence[float | None]) -> dict[str, Any]:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    arr = np.asarray(vals, np.float64)
    std = float(arr.std(ddof=1)) if len(arr) > 1 else None
    return {"mean": float(arr.mean()), "std": std, "n": len(arr)}


def collect_runs(exp_dir: Path, plans: Sequence[RunPlan]) -> list[dict[str, Any]]:
    """One row per finished run: group, model, held-out set, WA/UA, best-epoch WA/UA."""
    rows = []
    for plan in plans:
        workdir = exp_dir / plan.key
        path = workdir / eval_lib.RESULTS_FILE
        if not path.exists():
            continue
        res = json.loads(path.read_text())
        best = best_epoch_scores(workdir)
        val = validation_scores(workdir)
        rows.append(
            {
                "group": plan.group,
                "model": plan.model,
                "fold": plan.fold,
                "seed": plan.seed,
                "split": res.get("split", {}).get("name"),
                "wa": res["wa"],
                "ua": res["ua"],
                "best_epoch_wa": best["best_wa"],
                "best_epoch_ua": best["best_ua"],
                "val_wa": val["val_wa"],
                "val_ua": val["val_ua"],
                "num_test_utterances": res["num_utterances"],
                "confusion_matrix": res["confusion_matrix"],
                "label_names": res["label_names"],
                "step": res.get("step"),
                "train_seconds": res.get("train_seconds"),
                "workdir": plan.key,
            }
        )
    return rows


def summarize_rows(rows: Sequence[dict[str, Any]], models: Sequence[str]) -> dict[str, Any]:
    """Per model: mean ± sample std (ddof 1) of WA, UA and the best-epoch numbers over runs,
    and the confusion matrix pooled (summed) over runs."""
    out = {}
    for model in models:
        mine = [r for r in rows if r["model"] == model]
        if not mine:
            continue
        stats: dict[str, Any] = {"label": MODEL_LABELS.get(model, model), "runs": len(mine)}
        for k in ("wa", "ua", "best_epoch_wa", "best_epoch_ua", "val_wa", "val_ua"):
            stats[k] = _mean_std([r.get(k) for r in mine])
        cms = [r["confusion_matrix"] for r in mine if r.get("confusion_matrix") is not None]
        if cms:
            pooled = np.sum(np.asarray(cms, np.int64), axis=0)
            stats["pooled_confusion_matrix"] = pooled.tolist()
            stats["pooled_wa"] = float(np.trace(pooled) / max(pooled.sum(), 1))
        out[model] = stats
    return out


def write_summary(
    exp_dir: str | os.PathLike,
    *,
    spec: ExperimentSpec | None = None,
    plans: Sequence[RunPlan] | None = None,
) -> dict[str, Any]:
    """Builds the summary of the finished runs and writes ``summary.json`` and ``summary.md``."""
    exp_dir = Path(exp_dir)
    summary = build_summary(exp_dir, spec=spec, plans=plans)
    for model, stats in summary["models"].items():
        names = next((r["label_names"] for r in summary["runs"] if r["model"] == model), None)
        if "pooled_confusion_matrix" in stats and names:
            plot = eval_lib.plot_confusion(
                np.asarray(stats["pooled_confusion_matrix"]),
                names,
                exp_dir / f"confusion_{model}.png",
                title=f"{stats['label']}: confusion pooled over {stats['runs']} run(s)",
            )
            stats["pooled_confusion_plot"] = plot.name
    eval_lib.write_json(exp_dir / SUMMARY_JSON, summary)
    (exp_dir / SUMMARY_MD).write_text(format_summary_markdown(summary))
    return summary


_GROUP_PATTERNS = {"loso": re.compile(r"fold(\d+)-seed(\d+)"), "paper": re.compile(r"seed(\d+)")}


def _with_earlier_runs(
    exp_dir: Path, spec: ExperimentSpec, plans: Sequence[RunPlan]
) -> tuple[list[RunPlan], ExperimentSpec]:
    """The planned runs plus every *finished* run of earlier invocations of the same experiment,
    and the spec they cover (folds, seeds and students widened to include them).

    Folds, seeds and students may change between invocations (the data, protocol, presets and
    overrides may not, so every run in the directory is comparable): a summary covers all
    finished runs, e.g. TCKD/NCKD students added later for one seed next to the full DKD grid.
    """
    pattern = _GROUP_PATTERNS[spec.protocol]
    folds, seeds, models = set(spec.folds), set(spec.seeds), set()
    for result in exp_dir.glob(f"*/*/{eval_lib.RESULTS_FILE}"):
        group, run = result.parent.parent.name, result.parent.name
        m = pattern.fullmatch(group)
        model = "teacher" if run == "teacher" else run.removeprefix("student_")
        if not m or (model != "teacher" and model not in STUDENT_LOSSES):
            continue
        nums = [int(x) for x in m.groups()]
        folds.update(nums[:-1])  # loso: the fold; paper: none
        seeds.add(nums[-1])
        models.add(model)
    if not models:
        return list(plans), spec
    extra_students = [s for s in STUDENT_LOSSES if s in models and s not in spec.students]
    students = [*spec.students, *extra_students]
    union = dataclasses.replace(
        spec, folds=tuple(sorted(folds)), seeds=tuple(sorted(seeds)), students=tuple(students)
    )
    keys = {p.key for p in plans}
    extra = [
        p
        for p in plan_runs(union, exp_dir)
        if p.key not in keys and (exp_dir / p.key / eval_lib.RESULTS_FILE).exists()
    ]
    return [*plans, *extra], union


def build_summary(
    exp_dir: str | os.PathLike,
    *,
    spec: ExperimentSpec | None = None,
    plans: Sequence[RunPlan] | None = None,
) -> dict[str, Any]:
    """The summary dict of the finished runs (what ``write_summary`` writes), writing nothing."""
    exp_dir = Path(exp_dir)
    if spec is None:
        path = exp_dir / EXPERIMENT_FILE
        if not path.exists():
            raise ExperimentError(f"{path}: missing (not an experiment directory)")
        spec = ExperimentSpec.from_dict(json.loads(path.read_text()))
    if plans is None:
        plans = plan_runs(spec, exp_dir)
    plans, covered = _with_earlier_runs(exp_dir, spec, plans)
    students = list(covered.students)
    rows = collect_runs(exp_dir, plans)
    models = ["teacher", *students]
    metadata = records.load_metadata(spec.data) if Path(spec.data).exists() else {}
    summary = {
        "experiment": covered.to_dict(),
        "data_content_hash": metadata.get("content_hash"),
        "num_planned_runs": len(plans),
        "num_finished_runs": len(rows),
        "models": summarize_rows(rows, models),
        "runs": rows,
        "metric_notes": {
            "wa_ua": "last-epoch checkpoint, held-out utterances, mean of segment logits per "
            "utterance; mean ± sample std (ddof=1) over runs",
            "best_epoch": "OPTIMISTIC: max over epochs of the test-set WA and (independently) UA, "
            "i.e. the epoch is chosen on the test set, as in the head-fusion lineage code",
            "val": "last-epoch WA/UA on the validation hold-out carved from the training "
            "speakers/utterances (data.validation); None without one",
        },
    }
    return summary


def _fmt(stat: dict[str, Any]) -> str:
    if stat["mean"] is None:
        return "n/a"
    if stat["std"] is None:
        return f"{100 * stat['mean']:.1f}"
    return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _title(summary: dict[str, Any]) -> str:
    exp = summary["experiment"]
    groups = len({r["group"] for r in summary["runs"]})
    if exp["protocol"] == "loso":
        what = f"loso (leave one session out), folds {exp['folds']}, seeds {exp['seeds']}"
    else:
        what = f"paper (random 80/20 utterance split), seeds {exp['seeds']}"
    return f"{what}; {groups} fold/seed group(s), {summary['num_finished_runs']} runs finished"


def _has_validation(summary: dict[str, Any]) -> bool:
    return any(r.get("val_ua") is not None for r in summary["runs"])


def format_summary_text(summary: dict[str, Any], *, validation_only: bool = False) -> str:
    """The per-model table for the terminal (``validation_only``: validation scores only, for
    choosing settings without seeing the held-out speakers)."""
    if validation_only:
        lines = [
            _title(summary),
            "VALIDATION WA / UA in %, mean ± std over runs (last epoch, validation hold-out "
            "inside the training data; test scores not shown)",
        ]
        head = f"{'model':<14} {'runs':>4}  {'val WA':>12}  {'val UA':>12}"
        lines += [head, "-" * len(head)]
        for stats in summary["models"].values():
            lines.append(
                f"{stats['label']:<14} {stats['runs']:>4}  {_fmt(stats['val_wa']):>12}  "
                f"{_fmt(stats['val_ua']):>12}"
            )
        lines.append(
            "per run (val UA): "
            + ", ".join(f"{r['workdir']} {_pct(r.get('val_ua'))}" for r in summary["runs"])
        )
        return "\n".join(lines)
    lines = [
        _title(summary),
        "WA / UA in %, mean ± std over runs (last epoch, held-out utterances)",
    ]
    val = _has_validation(summary)
    head = f"{'model':<14} {'runs':>4}  {'WA':>12}  {'UA':>12}   {'best-epoch-on-test WA/UA *':>26}"
    head += f"  {'val UA':>12}" if val else ""
    lines += [head, "-" * len(head)]
    for stats in summary["models"].values():
        best = f"{_fmt(stats['best_epoch_wa'])} / {_fmt(stats['best_epoch_ua'])}"
        lines.append(
            f"{stats['label']:<14} {stats['runs']:>4}  {_fmt(stats['wa']):>12}  "
            f"{_fmt(stats['ua']):>12}   {best:>26}"
            + (f"  {_fmt(stats['val_ua']):>12}" if val else "")
        )
    lines.append(
        "* optimistic: epoch picked on the test set (lineage protocol); not a fair estimate"
    )
    if summary["num_finished_runs"] < summary["num_planned_runs"]:
        lines.append(
            f"({summary['num_planned_runs'] - summary['num_finished_runs']} planned runs are not "
            "finished yet)"
        )
    return "\n".join(lines)


def format_summary_markdown(summary: dict[str, Any]) -> str:
    """``summary.md``: settings, the per-model table and the per-run table."""
    exp = summary["experiment"]
    val = _has_validation(summary)
    lines = [
        "# Experiment summary",
        "",
        f"- protocol: {_title(summary)}",
        f"- data: `{exp['data']}` (content hash `{summary.get('data_content_hash')}`)",
        f"- presets: student `{exp['preset']}`, teacher `{exp['teacher_preset'] or exp['preset']}`"
        f"; students: {', '.join(exp['students']) or 'none'}",
        f"- overrides: {', '.join(f'`{o}`' for o in exp['overrides']) or 'none'}",
        "",
        "WA (overall accuracy) and UA (mean per-class recall) on the held-out utterances, in %, "
        "from the last-epoch checkpoint (segment logits averaged per utterance); mean ± sample "
        "std over runs.",
        "",
        "| model | runs | WA | UA | best epoch on test: WA ⚠ | best epoch on test: UA ⚠ |"
        + (" validation WA | validation UA |" if val else ""),
        "|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if val else ""),
    ]
    for stats in summary["models"].values():
        lines.append(
            f"| {stats['label']} | {stats['runs']} | {_fmt(stats['wa'])} | {_fmt(stats['ua'])} "
            f"| {_fmt(stats['best_epoch_wa'])} | {_fmt(stats['best_epoch_ua'])} |"
            + (f" {_fmt(stats['val_wa'])} | {_fmt(stats['val_ua'])} |" if val else "")
        )
    lines += [
        "",
        "⚠ **Optimistic, not a fair estimate**: the maximum over epochs of the *test-set* WA and,"
        " separately, UA (the epoch is chosen on the test set, and the two maxima may come from "
        "different epochs), as reported by the head-fusion lineage code. Shown only for "
        "comparison with numbers obtained that way.",
        "",
        "## Per run",
        "",
        "| group | held out | model | test utterances | WA | UA | best-epoch WA ⚠ | "
        "best-epoch UA ⚠ | workdir |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in summary["runs"]:
        lines.append(
            f"| {r['group']} | {r['split']} | {MODEL_LABELS.get(r['model'], r['model'])} "
            f"| {r['num_test_utterances']} | {_pct(r['wa'])} | {_pct(r['ua'])} "
            f"| {_pct(r['best_epoch_wa'])} | {_pct(r['best_epoch_ua'])} | `{r['workdir']}` |"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Reproduction check
# --------------------------------------------------------------------------------------------

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
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [_drop_timings(json.loads(line)) for line in path.read_text().splitlines() if line]


def compare_runs(original: str | os.PathLike, rerun: str | os.PathLike) -> dict[str, Any]:
    """Compares two finished runs bit for bit.

    Checks the results (WA, UA, confusion matrix, per-class scores, evaluated step, and every
    utterance's mean logits in ``utterance_scores.csv``), every non-timing value of
    ``metrics.jsonl``, and every leaf of the restored variables (params and batch statistics:
    same shape, dtype and bytes).

    Returns:
        {"match": bool, "results": bool, "metrics": bool, "params": bool, "differences": [...]}
    """
    from dkd_jax import checkpointing

    original, rerun = Path(original), Path(rerun)
    diffs: list[str] = []
    ra = json.loads((original / eval_lib.RESULTS_FILE).read_text())
    rb = json.loads((rerun / eval_lib.RESULTS_FILE).read_text())
    keys = ("wa", "ua", "confusion_matrix", "per_class", "num_utterances", "num_segments", "step")
    res_ok = True
    for k in keys:
        if ra.get(k) != rb.get(k):
            res_ok = False
            diffs.append(f"results.{k}: {ra.get(k)!r} != {rb.get(k)!r}")
    sa, sb = (d / eval_lib.SCORES_FILE for d in (original, rerun))
    if sa.exists() and sb.exists() and sa.read_bytes() != sb.read_bytes():
        res_ok = False
        diffs.append(f"{eval_lib.SCORES_FILE}: per-utterance scores differ")
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
    va = checkpointing.restore_run(original).variables
    vb = checkpointing.restore_run(rerun).variables
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
    }


def reproduce(
    exp_dir: str | os.PathLike,
    *,
    fold: int | None = None,
    model: str | None = None,
    scratch: str | os.PathLike | None = None,
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
        scratch: where the reruns go (default ``EXP/reproduce``; emptied first).
        progress: progress bars.
        quiet: print nothing.

    Returns:
        {"match": bool, "runs": {run key: compare_runs(...)}}; also written to
        ``<scratch>/reproduce.json``.
    """
    exp_dir = Path(exp_dir)
    path = exp_dir / EXPERIMENT_FILE
    if not path.exists():
        raise ExperimentError(f"{path}: missing (not an experiment directory)")
    spec = ExperimentSpec.from_dict(json.loads(path.read_text()))
    plans = plan_runs(spec, exp_dir)
    if fold is not None:
        plans = [p for p in plans if (p.fold if spec.protocol == "loso" else p.seed) == fold]
    if model is not None:
        plans = [p for p in plans if p.model == model]
    plans = [p for p in plans if (exp_dir / p.key / eval_lib.RESULTS_FILE).exists()]
    if not plans:
        raise ExperimentError(
            f"{exp_dir}: no finished run matches fold={fold} model={model} (finished runs have a "
            "results.json)"
        )
    from dkd_jax import checkpointing

    rerun_plans = []
    for plan in plans:  # rerun exactly what ran: the run's own resolved config.json
        try:
            cfg = checkpointing.load_config(exp_dir / plan.key)
        except ValueError as e:
            raise ExperimentError(f"cannot reproduce {plan.key}: {e}") from None
        rerun_plans.append(dataclasses.replace(plan, config=cfg))
    plans = rerun_plans
    scratch = Path(scratch) if scratch is not None else exp_dir / "reproduce"
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    enable_compilation_cache(exp_dir / CACHE_DIR)
    rerun_keys = {p.key for p in plans}
    report: dict[str, Any] = {"runs": {}}
    for plan in plans:
        teacher = None
        if plan.teacher_key is not None:
            teacher = (scratch if plan.teacher_key in rerun_keys else exp_dir) / plan.teacher_key
        _say(f"reproducing {plan.key} -> {scratch / plan.key}", quiet=quiet)
        plan.config.train.progress = progress
        execute_run(plan, scratch / plan.key, teacher_workdir=teacher, quiet=True)
        cmp = compare_runs(exp_dir / plan.key, scratch / plan.key)
        report["runs"][plan.key] = cmp
        verdict = "MATCH (bit for bit)" if cmp["match"] else "DIFFERENT"
        _say(f"    {plan.key}: {verdict}", quiet=quiet)
        for d in cmp["differences"][:10]:
            _say(f"      {d}", quiet=quiet)
    report["match"] = all(r["match"] for r in report["runs"].values())
    report["provenance"] = eval_lib.provenance()
    eval_lib.write_json(scratch / "reproduce.json", report)
    _say(
        f"reproduce: {'all runs match bit for bit' if report['match'] else 'MISMATCH'} "
        f"({len(plans)} run(s); report {scratch / 'reproduce.json'})",
        quiet=quiet,
    )
    return report


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


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
        "--overwrite", action="store_true", help="if --out holds other settings, delete its runs"
    )
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
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
    q.add_argument("--scratch", help="where the reruns go (default EXP/reproduce)")
    q.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in argv if a.startswith("--config.")]
    args = _parser().parse_args([a for a in argv if not a.startswith("--config.")])
    try:
        if args.command == "run":
            spec = make_spec(
                data=args.data,
                protocol=args.protocol,
                folds=_parse_ints(args.folds, "--folds"),
                seeds=_parse_ints(args.seeds, "--seeds"),
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
            )
        elif args.command == "summarize":
            if overrides:
                raise ExperimentError("summarize takes no --config overrides")
            if args.validation_only:
                summary = build_summary(args.exp_dir)
                if not _has_validation(summary):
                    raise ExperimentError(
                        f"{args.exp_dir}: no finished run has a validation hold-out "
                        "(data.validation=none)"
                    )
                print(format_summary_text(summary, validation_only=True))
            else:
                summary = write_summary(args.exp_dir)
                print(format_summary_text(summary))
        else:
            if overrides:
                raise ExperimentError("reproduce takes no --config overrides")
            report = reproduce(
                args.exp_dir,
                fold=args.fold,
                model=args.model,
                scratch=args.scratch,
                progress=not args.no_progress,
            )
            return 0 if report["match"] else 1
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as e:
        from dkd_jax import train_lib

        known = (
            ExperimentError,
            eval_lib.EvalError,
            records.DataError,
            config_lib.ConfigError,
            train_lib.TrainingError,
        )
        if not isinstance(e, known):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
