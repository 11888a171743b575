"""The summary of an experiment: per-model mean ± std over runs, pooled confusion matrices,
``summary.json``, ``summary.md`` and the terminal table.

Headline numbers are last-epoch scores. The lineage's "best epoch on the test set" numbers (max
over epochs of the test WA and, independently, of the test UA, read from ``metrics.jsonl``) are
reported in a separate, clearly labelled column: they select the epoch on the test set and are
optimistic.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dkd_jax import eval_lib, jsonio, metrics, records, run_dir
from dkd_jax.experiment import checks
from dkd_jax.experiment.spec import (
    MODEL_LABELS,
    STUDENT_LOSSES,
    SUMMARY_JSON,
    SUMMARY_MD,
    ExperimentError,
    ExperimentSpec,
    RunPlan,
    load_spec,
    plan_runs,
    run_mismatch,
)


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
    for rec in run_dir.read_metrics(workdir):
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
    for rec in run_dir.read_metrics(workdir):
        w, u = _eval_wa_ua(rec, "validation")
        if w is not None or u is not None:
            out = {"val_wa": w, "val_ua": u}
    return out


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


def collect_runs(
    exp_dir: Path, plans: Sequence[RunPlan], metadata: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """One row per finished run: group, model, held-out set, WA/UA, best-epoch WA/UA.

    Raises:
      ExperimentError: a run whose results cannot be read, score a partly trained model, or
        come from another config, other data or another split than its plan (``metadata``:
        the prep's ``metadata.json``):
        a mean over runs must not mix them in, nor drop them in silence.
    """
    rows = []
    for plan in plans:
        workdir = exp_dir / plan.key
        try:
            res = run_dir.load_results(workdir, remedy="run the experiment again")
        except run_dir.RunDirError as e:
            raise ExperimentError(str(e)) from None
        if res is None:
            continue
        why = run_mismatch(workdir, plan.config, metadata)
        if why:
            raise ExperimentError(
                f"{workdir}: a run {why}, not this experiment's {plan.model}: the summary would "
                "average it in with the others; run the experiment again with --overwrite to "
                "train such runs again (or summarize another copy without it)"
            )
        problem = run_dir.not_final_results(workdir, res)
        if problem:  # a summary must not average it in, nor drop it in silence
            raise ExperimentError(
                f"{workdir}: {problem}; run the experiment command again to finish (or re-score) it"
            )
        best = best_epoch_scores(workdir)
        val = validation_scores(workdir)
        rows.append(
            {
                "group": plan.group,
                "model": plan.model,
                "fold": plan.fold,
                "seed": plan.seed,
                "split": run_dir.split_name(res),
                "wa": res["wa"],
                "ua": res["ua"],
                "best_epoch_wa": best["best_wa"],
                "best_epoch_ua": best["best_ua"],
                "val_wa": val["val_wa"],
                "val_ua": val["val_ua"],
                "num_test_utterances": res["num_utterances"],
                "absent_classes": list(res.get("absent_classes") or []),
                "untrained_classes": list(res.get("untrained_classes") or []),
                "collapse": eval_lib.collapse_note(res["confusion_matrix"], res["label_names"]),
                "confusion_matrix": res["confusion_matrix"],
                "label_names": res["label_names"],
                "step": res.get("step"),
                "train_seconds": res.get("train_seconds"),
                "workdir": plan.key,
            }
        )
    return rows


def collect_baselines(exp_dir: Path, plans: Sequence[RunPlan]) -> list[dict[str, Any]]:
    """One row per distinct split and baseline model (``checks``): test WA/UA
    (``results.json``) and validation WA/UA (``validation.json``), whichever exist.

    A fit is deterministic given its training and held-out utterances (its ``fingerprint``), so
    the groups of one ``loso`` fold, which differ by training seed only, hold the same fit: it
    counts once (its first group's), not once per seed, which would repeat it in the mean, shrink
    its std and count its utterances again in the pooled matrix."""
    rows = []
    seen: set[tuple] = set()
    for plan in {p.group: p for p in plans}.values():
        for model in checks.BASELINE_MODELS:
            found = {}
            for validation in (False, True):
                path = checks.baseline_file(exp_dir, plan.group, model, validation=validation)
                try:
                    found[validation] = json.loads(path.read_text())
                except (FileNotFoundError, json.JSONDecodeError):
                    continue  # not fitted (yet), or cut: refitted by the next run
            if not found:
                continue
            test, val = found.get(False) or {}, found.get(True) or {}
            # Each fit on its own: a test fit already counted is left out of this row even when
            # its validation fit is new (a --validation-only pass of some seeds only).
            if (model, "test", test.get("fingerprint")) in seen:
                test = {}
            if (model, "val", val.get("fingerprint")) in seen:
                val = {}
            for kind, fit in (("test", test), ("val", val)):
                if fit.get("fingerprint") is not None:
                    seen.add((model, kind, fit["fingerprint"]))
            if not test and not val:
                continue
            rows.append(
                {
                    "group": plan.group,
                    "model": model,
                    "fold": plan.fold,
                    "seed": plan.seed,
                    "split": (test or val).get("split", {}).get("name"),
                    "wa": test.get("wa"),
                    "ua": test.get("ua"),
                    "best_epoch_wa": None,
                    "best_epoch_ua": None,
                    "val_wa": val.get("wa"),
                    "val_ua": val.get("ua"),
                    "num_test_utterances": test.get("num_utterances"),
                    "absent_classes": list(test.get("absent_classes") or []),
                    "untrained_classes": list((test or val).get("untrained_classes") or []),
                    "confusion_matrix": test.get("confusion_matrix"),
                    "label_names": (test or val).get("label_names"),
                    "C": (test or val).get("C"),
                    "workdir": f"{plan.group}/{model}",
                }
            )
    return rows


def summarize_rows(rows: Sequence[dict[str, Any]], models: Sequence[str]) -> dict[str, Any]:
    """Per model: mean ± sample std (ddof 1) of WA, UA and the best-epoch numbers over runs,
    the confusion matrix pooled (summed) over runs with its WA and UA (every test utterance
    counted once per run, so folds whose test set lacks a class are not averaged with the
    others), and
    how many runs' test sets lack a class."""
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
            stats["pooled_wa"] = metrics.weighted_accuracy(pooled) if pooled.sum() else None
            stats["pooled_ua"] = metrics.unweighted_accuracy(pooled) if pooled.sum() else None
        stats["runs_missing_classes"] = sum(1 for r in mine if r.get("absent_classes"))
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
    text = format_summary_markdown(summary)  # both made before either is written: an
    jsonio.write_text(exp_dir / SUMMARY_MD, text)  # interrupt can only come between the two
    jsonio.write_json(exp_dir / SUMMARY_JSON, summary)  # renames, not a half-made summary
    return summary


_GROUP_PATTERNS = {"loso": re.compile(r"fold(\d+)-seed(\d+)"), "paper": re.compile(r"seed(\d+)")}


def _runs_with_results(exp_dir: Path, pattern: re.Pattern) -> list[tuple[str, str]]:
    """(group, run) of every run folder holding a results file, in the groups ``pattern``
    names. Folders are listed with ``os.listdir``, which raises on one this user may not list
    (a glob would skip it, and the summary would drop its runs in silence)."""
    found = []
    for group in sorted(os.listdir(exp_dir)):
        if not pattern.fullmatch(group) or not (exp_dir / group).is_dir():
            continue
        for run in sorted(os.listdir(exp_dir / group)):
            if (exp_dir / group / run / run_dir.RESULTS_FILE).exists():
                found.append((group, run))
    return found


def runs_in_folder(exp_dir: Path, spec: ExperimentSpec | None) -> list[str]:
    """``group/run`` of every run folder of the experiment folder, finished or not (groups
    named as ``spec``'s protocol names them; any protocol's without ``spec``)."""
    patterns = [_GROUP_PATTERNS[spec.protocol]] if spec else list(_GROUP_PATTERNS.values())
    out = []
    for group in sorted(os.listdir(exp_dir)):
        if any(p.fullmatch(group) for p in patterns) and (exp_dir / group).is_dir():
            out += [
                f"{group}/{run}"
                for run in sorted(os.listdir(exp_dir / group))
                if (exp_dir / group / run).is_dir()
            ]
    return out


def with_earlier_runs(
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
    for group, run in _runs_with_results(exp_dir, pattern):
        m = pattern.fullmatch(group)
        model = "teacher" if run == "teacher" else run.removeprefix("student_")
        if model != "teacher" and model not in STUDENT_LOSSES:
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
        if p.key not in keys and (exp_dir / p.key / run_dir.RESULTS_FILE).exists()
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
        spec = load_spec(exp_dir)
    if plans is None:
        plans = plan_runs(spec, exp_dir)
    plans, covered = with_earlier_runs(exp_dir, spec, plans)
    students = list(covered.students)
    if Path(spec.data).exists():
        metadata = records.load_metadata(spec.data)
    else:
        metadata = {}
        print(
            f"warning: {exp_dir}: its prep dir {spec.data} is not there (moved?): the summary "
            "has no data hash, confound numbers or class count, and the runs are not checked "
            "against the data",
            file=sys.stderr,
        )
    rows = collect_runs(exp_dir, plans, metadata)
    num_runs = len(rows)
    rows += collect_baselines(exp_dir, plans)
    models = ["teacher", *students, *checks.BASELINE_MODELS]
    stats = summarize_rows(rows, models)
    summary = {
        "experiment": covered.to_dict(),
        "data_content_hash": metadata.get("content_hash"),
        "num_planned_runs": len(plans),
        "num_finished_runs": num_runs,
        "models": stats,
        "runs": rows,
        "baseline_verdict": baseline_verdict(stats, key="ua"),
        "baseline_verdict_validation": baseline_verdict(stats, key="val_ua"),
        "confound": _confounds(metadata, plans),
        "normalization": _normalization(plans),
        "num_classes": len(metadata.get("label_names") or ()) or None,
        "metric_notes": {
            "wa_ua": "last-epoch checkpoint, held-out utterances, mean of segment logits per "
            "utterance; mean ± sample std (ddof=1) over runs",
            "best_epoch": "OPTIMISTIC: max over the evaluated epochs (train.eval_every_epochs) of "
            "the test-set WA and (independently) UA, "
            "i.e. the epoch is chosen on the test set, as in the head-fusion lineage code",
            "val": "last-epoch WA/UA on the validation hold-out carved from the training "
            "speakers/utterances (data.validation); None without one",
            "pooled": "WA/UA of the confusion matrix summed over runs (every held-out utterance "
            "once per run: once per seed of its fold); a run whose test set lacks a class has a "
            "UA over fewer classes",
            "baseline": "logistic regression on per-utterance feature means and stds, C chosen "
            "by speaker-grouped inner CV on the training speakers (dkd_jax.baseline)",
        },
    }
    return summary


def baseline_verdict(stats: dict[str, Any], *, key: str = "ua") -> str | None:
    """A plain sentence: does the best deep model beat the feature-statistics baseline on mean
    ``key`` ("ua" or "val_ua")? None without a baseline or a deep model."""
    base = stats.get("baseline", {}).get(key, {}).get("mean")
    deep = [
        (s[key]["mean"], s["label"])
        for m, s in stats.items()
        if m not in checks.BASELINE_MODELS and s[key]["mean"] is not None
    ]
    if base is None or not deep:
        return None
    best, label = max(deep)
    what = "validation UA" if key == "val_ua" else "UA"
    if best <= base:
        return (
            f"No deep model beats the feature-statistics baseline: the best, {label}, has "
            f"{what} {100 * best:.1f} % against the baseline's {100 * base:.1f} % on the same "
            "folds."
        )
    return (
        f"The best deep model, {label}, beats the feature-statistics baseline by "
        f"{100 * (best - base):.1f} {what} points ({100 * best:.1f} % vs {100 * base:.1f} %)."
    )


def _confounds(metadata: dict[str, Any], plans: Sequence[RunPlan]) -> dict[str, Any]:
    """The speaker–label confound of each group's training split."""
    if not metadata.get("utterances"):
        return {}
    return {
        p.group: checks.group_confound(p, metadata) for p in {g.group: g for g in plans}.values()
    }


def _normalization(plans: Sequence[RunPlan]) -> str | None:
    """The deep models' ``data.normalization`` (None when the runs differ or there are none)."""
    modes = {p.config.data.normalization for p in plans}
    return modes.pop() if len(modes) == 1 else None


def utterance_normalization_note(summary: dict[str, Any], *, key: str = "ua") -> str | None:
    """With ``normalization=utterance``: the deep models never see each utterance's per-band
    mean and std, which are the whole input of the feature-statistics baseline, so the
    baseline's score (against chance, ``1 / classes`` in UA) is what those statistics are worth
    on these folds (emotion, or speaker and recording level: the corpus decides). None
    otherwise or without a baseline score."""
    if summary.get("normalization") != "utterance":
        return None
    base = summary.get("models", {}).get("baseline", {}).get(key, {}).get("mean")
    if base is None:
        return None
    what = "validation UA" if key == "val_ua" else "UA"
    classes = summary.get("num_classes")
    chance = f" (chance {100 / classes:.1f} %)" if classes else ""
    return (
        "normalization=utterance removes each utterance's per-band mean and std from the deep "
        "models' input: exactly the baseline's features, which alone reach "
        f"{what} {100 * base:.1f} %{chance} here, information the deep models cannot use. A "
        "run with normalization=global shows what removing it costs."
    )


def _fmt(stat: dict[str, Any]) -> str:
    if stat["mean"] is None:
        return "n/a"
    if stat["std"] is None:
        return f"{100 * stat['mean']:.1f}"
    return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"


def percent(x: float | None) -> str:
    """A fraction as a percentage with one decimal ("n/a" for None)."""
    return "n/a" if x is None else f"{100 * x:.1f}"


def _title(summary: dict[str, Any]) -> str:
    exp = summary["experiment"]
    groups = len({r["group"] for r in summary["runs"]})
    if exp["protocol"] == "loso":
        what = f"loso (leave one session out), folds {exp['folds']}, seeds {exp['seeds']}"
    else:
        what = f"paper (random 80/20 utterance split), seeds {exp['seeds']}"
    return f"{what}; {groups} fold/seed group(s), {summary['num_finished_runs']} runs finished"


def has_validation(summary: dict[str, Any]) -> bool:
    return any(r.get("val_ua") is not None for r in summary["runs"])


def _notes(summary: dict[str, Any], *, validation_only: bool) -> list[str]:
    """The lines under a table: the baseline verdict, folds lacking a class, the confound."""
    out = []
    verdict = summary.get("baseline_verdict_validation" if validation_only else "baseline_verdict")
    if verdict:
        out.append(verdict)
    level = utterance_normalization_note(summary, key="val_ua" if validation_only else "ua")
    if level:
        out.append(level)
    lacking = [r for r in summary["runs"] if r.get("absent_classes")]
    if lacking and not validation_only:
        # Per fold/seed group: its models and baselines share the test set (a count of runs,
        # baselines included, read as more than the runs the title says finished).
        groups = sorted({f"{r['group']} (no {', '.join(r['absent_classes'])})" for r in lacking})
        out.append(
            f"{len(groups)} fold/seed group(s) have a test set that lacks a class, so their UA "
            f"averages fewer classes: {'; '.join(groups)}. The pooled columns count every test "
            "utterance once."
        )
    untrained = [r for r in summary["runs"] if r.get("untrained_classes")]
    if untrained:
        groups = sorted(
            {f"{r['group']} (no {', '.join(r['untrained_classes'])})" for r in untrained}
        )
        out.append(
            f"{len(groups)} fold/seed group(s) trained on no utterance of a class, so they "
            "never predict "
            f"it and UA counts its recall as 0 wherever it is tested: {'; '.join(groups)}. "
            "A class recorded by one speaker or session only does this under loso."
        )
    collapsed = [r for r in summary["runs"] if r.get("collapse")]
    if collapsed and not validation_only:
        listed = "; ".join(f"{r['workdir']} {r['collapse']}" for r in collapsed)
        out.append(
            f"{len(collapsed)} run(s) learnt nothing usable on their test set: {listed}. "
            f"{eval_lib.COLLAPSE_HINT.capitalize()}; a student of such a teacher learns little."
        )
    strong = [
        g for g, c in (summary.get("confound") or {}).items() if c.get("strength") == "strong"
    ]
    if strong:
        out.append(
            f"Speaker predicts label strongly in the training data of {len(strong)} group(s) "
            f"({', '.join(strong)}): per-speaker normalisation would remove the emotion there."
        )
    return out


def format_summary_text(summary: dict[str, Any], *, validation_only: bool = False) -> str:
    """The per-model table for the terminal (``validation_only``: validation scores only, for
    choosing settings without seeing the held-out speakers)."""
    width = max([14, *(len(s["label"]) for s in summary["models"].values())])
    if validation_only:
        lines = [
            _title(summary),
            "VALIDATION WA / UA in %, mean ± std over runs (last epoch, validation hold-out "
            "inside the training data; test scores not shown)",
        ]
        head = f"{'model':<{width}} {'runs':>4}  {'val WA':>12}  {'val UA':>12}"
        lines += [head, "-" * len(head)]
        for stats in summary["models"].values():
            lines.append(
                f"{stats['label']:<{width}} {stats['runs']:>4}  {_fmt(stats['val_wa']):>12}  "
                f"{_fmt(stats['val_ua']):>12}"
            )
        lines.append(
            "per run (val UA): "
            + ", ".join(f"{r['workdir']} {percent(r.get('val_ua'))}" for r in summary["runs"])
        )
        return "\n".join(lines + _notes(summary, validation_only=True))
    lines = [
        _title(summary),
        "WA / UA in %, mean ± std over runs (last epoch, held-out utterances); pooled: all "
        "test utterances of all runs",
    ]
    val = has_validation(summary)
    head = (
        f"{'model':<{width}} {'runs':>4}  {'WA':>12}  {'UA':>12}  {'pooled WA/UA':>13}   "
        f"{'best-epoch-on-test WA/UA *':>26}"
    )
    head += f"  {'val UA':>12}" if val else ""
    lines += [head, "-" * len(head)]
    for stats in summary["models"].values():
        best = f"{_fmt(stats['best_epoch_wa'])} / {_fmt(stats['best_epoch_ua'])}"
        if stats["best_epoch_wa"]["mean"] is None:
            best = ""
        pooled = f"{percent(stats.get('pooled_wa'))} / {percent(stats.get('pooled_ua'))}"
        lines.append(
            f"{stats['label']:<{width}} {stats['runs']:>4}  {_fmt(stats['wa']):>12}  "
            f"{_fmt(stats['ua']):>12}  {pooled:>13}   {best:>26}"
            + (f"  {_fmt(stats['val_ua']):>12}" if val else "")
        )
    lines.append(
        "* optimistic: epoch picked on the test set (lineage protocol); not a fair estimate"
    )
    lines += _notes(summary, validation_only=False)
    if summary["num_finished_runs"] < summary["num_planned_runs"]:
        lines.append(
            f"({summary['num_planned_runs'] - summary['num_finished_runs']} planned runs are not "
            "finished yet)"
        )
    return "\n".join(lines)


def format_summary_markdown(summary: dict[str, Any]) -> str:
    """``summary.md``: settings, the per-model table, notes, the confound, the per-run table."""
    exp = summary["experiment"]
    val = has_validation(summary)
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
        "std over runs, and pooled: the confusion matrix summed over runs (every held-out "
        "utterance counted once per run). The baseline is a logistic regression on each "
        "utterance's per-band feature mean and std, fitted on the same training utterances.",
        "",
        "| model | runs | WA | UA | pooled WA | pooled UA | best epoch on test: WA ⚠ "
        "| best epoch on test: UA ⚠ |" + (" validation WA | validation UA |" if val else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if val else ""),
    ]
    for stats in summary["models"].values():
        lines.append(
            f"| {stats['label']} | {stats['runs']} | {_fmt(stats['wa'])} | {_fmt(stats['ua'])} "
            f"| {percent(stats.get('pooled_wa'))} | {percent(stats.get('pooled_ua'))} "
            f"| {_fmt(stats['best_epoch_wa'])} | {_fmt(stats['best_epoch_ua'])} |"
            + (f" {_fmt(stats['val_wa'])} | {_fmt(stats['val_ua'])} |" if val else "")
        )
    lines += ["", *(f"- {n}" for n in _notes(summary, validation_only=False))]
    lines += [
        "",
        "⚠ **Optimistic, not a fair estimate**: the maximum over the evaluated epochs of the "
        "*test-set* WA and,"
        " separately, UA (the epoch is chosen on the test set, and the two maxima may come from "
        "different epochs), as reported by the head-fusion lineage code. Shown only for "
        "comparison with numbers obtained that way.",
    ]
    lines += _confound_table(summary.get("confound") or {})
    lines += [
        "",
        "## Per run",
        "",
        "| group | held out | model | test utterances | WA | UA | best-epoch WA ⚠ | "
        "best-epoch UA ⚠ | note | workdir |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in summary["runs"]:
        notes = []
        if r.get("absent_classes"):
            notes.append(f"test set lacks {', '.join(r['absent_classes'])}")
        if r.get("untrained_classes"):
            notes.append(f"trained without {', '.join(r['untrained_classes'])}")
        if r.get("collapse"):
            notes.append(r["collapse"])
        note = "; ".join(notes)
        lines.append(
            f"| {r['group']} | {r['split']} | {MODEL_LABELS.get(r['model'], r['model'])} "
            f"| {r['num_test_utterances']} | {percent(r['wa'])} | {percent(r['ua'])} "
            f"| {percent(r['best_epoch_wa'])} | {percent(r['best_epoch_ua'])} | {note} "
            f"| `{r['workdir']}` |"
        )
    return "\n".join(lines) + "\n"


def _confound_table(confounds: dict[str, Any]) -> list[str]:
    if not confounds:
        return []
    lines = [
        "",
        "## Speaker–label confound (training speakers of each group)",
        "",
        "Share of training speakers who show one emotion only, and the share of the label's "
        "entropy that the speaker explains. Where both are high, per-speaker normalisation "
        "removes the emotion (see `dkd_jax.confound`).",
        "",
        "| group | speakers | single-emotion speakers | label entropy explained | NMI | strength |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for group, c in confounds.items():
        lines.append(
            f"| {group} | {c.get('num_speakers')} | {percent(c.get('single_class_share'))} % "
            f"| {percent(c.get('label_entropy_explained'))} % | {c.get('nmi', 0):.2f} "
            f"| {c.get('strength')} |"
        )
    return lines
