"""What an experiment runs: its settings (``experiment.json``), its plan of runs, and which runs
are finished.

``<group>`` is ``fold<k>-seed<s>`` for ``loso`` (fold k holds out the k-th session; the seed is
the training seed) and ``seed<s>`` for ``paper`` (the seed draws the 80/20 split *and* seeds
training, as in the lineage code). Per group the teacher runs first, then each student.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dkd_jax import config as config_lib
from dkd_jax import jsonio, protocols, records, run_dir

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
    "baseline": "baseline (feature statistics)",
    "baseline_speaker": "baseline, per-speaker normalised",
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


_SPEC_TYPES = {
    "data": str,
    "protocol": str,
    "folds": int,
    "seeds": int,
    "preset": str,
    "teacher_preset": str,
    "students": str,
    "overrides": str,
}
_SPEC_LISTS = ("folds", "seeds", "students", "overrides")


def load_spec(exp_dir: str | os.PathLike) -> ExperimentSpec:
    """``EXP/experiment.json`` as an ExperimentSpec; ExperimentError naming the file and the
    problem when it is missing, not UTF-8 JSON, or not the fields ``run`` writes."""
    path = Path(exp_dir) / EXPERIMENT_FILE
    if not path.is_file():
        raise ExperimentError(f"{path}: missing (not an experiment directory)")
    try:
        d = jsonio.read_json_object(path)
    except jsonio.JSONFileError as e:
        raise ExperimentError(str(e)) from None
    fields = dataclasses.fields(ExperimentSpec)
    unknown = sorted(set(d) - {f.name for f in fields})
    required = [f.name for f in fields if f.default is dataclasses.MISSING]
    missing = [k for k in required if k not in d]
    if unknown or missing:
        what = [f"unknown field(s) {', '.join(unknown)}"] if unknown else []
        what += [f"missing field(s) {', '.join(missing)}"] if missing else []
        raise ExperimentError(f"{path}: {'; '.join(what)} (not written by this version?)")
    for key, value in d.items():
        kind = _SPEC_TYPES[key]
        items = value if key in _SPEC_LISTS and isinstance(value, list) else [value]
        ok = (key in _SPEC_LISTS) == isinstance(value, list) and all(
            isinstance(v, kind) and not isinstance(v, bool) for v in items
        )
        if not ok:
            want = f"a list of {kind.__name__}" if key in _SPEC_LISTS else kind.__name__
            raise ExperimentError(f"{path}: field {key} must be {want}, got {value!r}")
    return ExperimentSpec.from_dict(d)


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
    # none at all (--students ""): used to run the teachers alone without a word
    if bad or not students or len(set(students)) != len(students):
        raise ExperimentError(
            f"bad --students {','.join(students)!r}: choose distinct names from "
            f"{', '.join(STUDENT_LOSSES)}"
        )
    # canonical "group.field=value" (the CLI passes "--config.group.field=value")
    overrides = tuple(o.strip().lstrip("-").removeprefix("config.") for o in overrides)
    for item in overrides:
        path = item.split("=", 1)[0].strip()
        if path.startswith("config."):  # config.apply_overrides would strip a second prefix
            raise ExperimentError(f"override {item!r}: write it as --config.group.field=value")
        if path == "train.compilation_cache_dir":
            raise ExperimentError(
                f"override {item!r}: the runner keeps every run's compilation cache in "
                f"EXP/{CACHE_DIR} (set JAX_COMPILATION_CACHE_DIR to use another folder)"
            )
        if path in _RUNNER_FIELDS:
            raise ExperimentError(
                f"override {item!r}: the runner sets {path} itself (use --data, --protocol, "
                "--folds, --seeds, --students)"
            )
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
    if not seeds or any(not 0 <= s < 2**32 for s in seeds):
        raise ExperimentError(
            f"seeds must be integers in [0, 2**32) (JAX keys take 32 bits), got {list(seeds)}"
        )
    spec = ExperimentSpec(
        data=data,
        protocol=protocol,
        folds=tuple(int(f) for f in folds),
        seeds=tuple(int(s) for s in seeds),
        preset=preset,
        teacher_preset=teacher_preset,
        students=students,
        overrides=tuple(overrides),
    )
    # Every model's config as its runs will train it (the teacher may have its own preset,
    # each student its own loss), validated before any run starts.
    for model in ("teacher", *students):
        try:
            run_config(spec, model, spec.folds[0] if spec.folds else None, spec.seeds[0], "")
        except config_lib.ConfigError as e:
            raise ExperimentError(str(e)) from None
    return spec


def run_config(
    spec: ExperimentSpec, model: str, fold: int | None, seed: int, cache_dir: str
) -> config_lib.Config:
    preset = (spec.teacher_preset or spec.preset) if model == "teacher" else spec.preset
    # The role and loss go in with the overrides: validated alone, the overrides would be
    # judged as the preset's default model (e.g. alpha = beta = 0 as a DKD student's).
    role = (
        ["model.role=teacher"] if model == "teacher" else ["model.role=student", f"kd.loss={model}"]
    )
    cfg = config_lib.apply_overrides(config_lib.get_config(preset), [*spec.overrides, *role])
    cfg.data.prep_dir = spec.data
    cfg.data.protocol = spec.protocol
    if spec.protocol == "loso":
        cfg.data.fold = int(fold)
    else:
        cfg.data.split_seed = int(seed)
    cfg.train.seed = int(seed)
    cfg.train.compilation_cache_dir = cache_dir
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
            cfg = run_config(spec, model, fold, seed, cache_dir)
            plans.append(RunPlan(group=group, model=model, fold=fold, seed=seed, config=cfg))
    return plans


def _comparable(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    d = json.loads(json.dumps(cfg_dict))
    for path in _VOLATILE_FIELDS:
        group, field = path.split(".")
        d.get(group, {}).pop(field, None)
    return d


def is_finished(workdir: str | os.PathLike, cfg: config_lib.Config) -> bool:
    """True when ``workdir`` holds a ``results.json`` evaluated for this same training config,
    of its finished, last model (``run_dir.not_final_results``: ``eval.py`` on a killed run, or
    with ``--step`` / ``--best``, writes other results; the runner then resumes the run, which
    for a finished one only scores its last checkpoint again)."""
    results = run_dir.read_results(workdir)
    if results is None or run_dir.not_final_results(workdir, results):
        return False
    stored = results.get("config")
    if not isinstance(stored, dict):
        return False
    try:  # through the current schema: fields added since take their defaults
        stored = config_lib.to_dict(config_lib.from_dict(stored))
    except config_lib.ConfigError:  # a field that no longer exists: not this config
        return False
    return _comparable(stored) == _comparable(config_lib.to_dict(cfg))


def run_mismatch(
    workdir: str | os.PathLike, cfg: config_lib.Config, metadata: dict[str, Any] | None
) -> str | None:
    """Why the run in ``workdir`` is not the run ``cfg`` describes on the prep whose
    ``metadata.json`` is ``metadata`` (None: it is, or the folder holds no run yet; no
    ``metadata``: the data are not checked): trained with other settings (a preset changed
    between versions of dkd-jax, a config edited by hand), on other data (a prep rebuilt at the
    same path), or on another split of the same data (a protocol whose rule changed: the paper
    protocol keeps improvised dialogs only since dkd-jax's split rule said so)."""
    try:
        changed = run_dir.config_changes(workdir, cfg)
    except run_dir.RunDirError as e:
        return f"whose config cannot be read ({e})"
    if changed:
        return f"trained with other settings ({run_dir.format_changes(changed)})"
    if not metadata or not (Path(workdir) / run_dir.SPLIT_FILE).exists():
        return None
    try:
        split, info = run_dir.load_split(workdir)
    except run_dir.RunDirError as e:
        return f"whose split cannot be read ({e})"
    content_hash = metadata.get("content_hash")
    trained_on = info.get("content_hash")
    if content_hash and trained_on and trained_on != content_hash:
        why = records.front_end_note(info.get("front_end"), metadata)
        return (
            f"trained on other data (content hash {trained_on}; the prep holds {content_hash} "
            f"now: rebuilt at the same path?{why})"
        )
    try:
        planned = protocols.split_for_run(metadata, cfg.data)
    except ValueError as e:
        return f"whose split this prep cannot make now ({e})"
    if split != planned:
        return (
            f"trained on another split ({split.name}: {len(split.train_ids)} training and "
            f"{len(split.test_ids)} test utterances; planned now: {len(planned.train_ids)} and "
            f"{len(planned.test_ids)}; a protocol rule changed since?)"
        )
    return None
