"""What an experiment measures next to its deep models, per fold/seed group, on the same splits.

* **The speaker–label confound** (``dkd_jax.confound``) of each group's *training* split: how
  far the speaker alone predicts the label. With ``data.normalization=speaker`` a strong confound
  is a loud warning before training: per-speaker normalisation then removes the emotion; held-out
  speakers who show one emotion only get a note too (they are normalised on their own).
* **A feature-statistics baseline** (``dkd_jax.baseline``): a logistic regression on each
  utterance's per-band mean and standard deviation, its regularisation chosen by inner
  cross-validation over the training speakers only, fitted on the group's training utterances
  and scored on the same held-out utterances as the deep models. It always uses global
  standardisation (``baseline``, the yardstick); when the experiment normalises per speaker it
  is also fitted that way (``baseline_speaker``), which shows what that normalisation costs on
  this corpus. Results go to ``EXP/<group>/baseline[_speaker]/results.json`` (test) or
  ``validation.json`` (``--validation-only``: scored on the validation hold-out instead, never
  on the test set), with one prediction per utterance.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from pathlib import Path
from typing import Any

from dkd_jax import baseline, confound, jsonio, protocols
from dkd_jax.experiment.spec import RunPlan

_FIT_LOCK = threading.Lock()  # threadpoolctl's BLAS limit is process-wide (jobs > 1)

__all__ = [
    "BASELINE_MODELS",
    "baseline_file",
    "group_confound",
    "held_out_note",
    "run_baselines",
    "warn_confound",
]

BASELINE_MODELS = {"baseline": "global", "baseline_speaker": "speaker"}
"""Baseline model name → the feature normalisation it is fitted with."""


def baseline_file(exp_dir: Path, group: str, model: str, *, validation: bool = False) -> Path:
    """Where a group's baseline result lives."""
    return Path(exp_dir) / group / model / ("validation.json" if validation else "results.json")


def group_confound(plan: RunPlan, metadata: dict[str, Any]) -> dict[str, Any]:
    """The speaker–label confound numbers of the training split of ``plan``'s group."""
    split = protocols.split_for_run(metadata, plan.config.data)
    return confound.confound_from_metadata(metadata, split.train_ids)


def warn_confound(plan: RunPlan, numbers: dict[str, Any]) -> None:
    """Prints the normalisation warning when the confound is strong (to stderr, always: it may
    invalidate the whole experiment)."""
    text = confound.normalization_warning(numbers, plan.config.data.normalization)
    if text:
        print(f"{plan.group}, training speakers:\n{text}", file=sys.stderr, flush=True)


def held_out_note(plan: RunPlan, metadata: dict[str, Any]) -> str | None:
    """``confound.held_out_note`` of ``plan``'s split (None unless normalization=speaker)."""
    if plan.config.data.normalization != "speaker":
        return None
    split = protocols.split_for_run(metadata, plan.config.data)
    return confound.held_out_note(metadata, split.train_ids, split.test_ids)


def _fingerprint(metadata: dict[str, Any], train_ids, test_ids, normalization: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([metadata.get("content_hash"), normalization]).encode())
    h.update("\n".join(sorted(train_ids)).encode() + b"\0" + "\n".join(sorted(test_ids)).encode())
    return h.hexdigest()[:16]


def run_baselines(
    exp_dir: Path,
    plan: RunPlan,
    prep_dir: str,
    metadata: dict[str, Any],
    stats_cache: dict[str, Any],
    *,
    validation_only: bool = False,
) -> dict[str, dict[str, Any]]:
    """Fits (or reuses) the group's baselines; returns {model: result}.

    Args:
      exp_dir: the experiment directory.
      plan: any run of the group (its config gives the split and the normalisation).
      prep_dir: the prep directory.
      metadata: its metadata.
      stats_cache: holds the prep's ``baseline.utterance_statistics`` once computed.
      validation_only: score on the validation hold-out (needs one) instead of the test set.
    """
    split = protocols.split_for_run(metadata, plan.config.data)
    held_out = split.validation_ids if validation_only else split.test_ids
    if not held_out:
        return {}
    models = ["baseline"]
    if plan.config.data.normalization == "speaker":
        models.append("baseline_speaker")
    out = {}
    for model in models:
        norm = BASELINE_MODELS[model]
        path = baseline_file(exp_dir, plan.group, model, validation=validation_only)
        key = _fingerprint(metadata, split.train_ids, held_out, norm)
        try:
            old = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):  # unreadable: raised, never refitted
            old = None
        if isinstance(old, dict) and old.get("fingerprint") == key:
            out[model] = old
            continue
        if "stats" not in stats_cache:
            stats_cache["stats"] = baseline.utterance_statistics(prep_dir)
        with _FIT_LOCK:
            result = baseline.fit_baseline(
                stats_cache["stats"], split.train_ids, held_out, normalization=norm
            )
        result.update(
            fingerprint=key,
            split={"name": split.name, "held_out": "validation" if validation_only else "test"},
        )
        jsonio.write_json(path, result)
        out[model] = result
    return out
