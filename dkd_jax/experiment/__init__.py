"""Experiment runner: a whole protocol (folds/seeds × teacher + students) in one command.

Owns the layout of an experiment directory and everything needed to fill and summarise it::

    EXP/experiment.json          the experiment's settings (data, protocol, presets, overrides)
    EXP/<group>/teacher/         one training workdir per run (config.json, split.json,
    EXP/<group>/student_dkd/       metrics.jsonl, checkpoints/, results.json, confusion.png)
    EXP/summary.json, summary.md mean ± std of WA/UA per model, the per-run table
    EXP/.jax_cache/              persistent XLA compilation cache shared by all runs (unless
                                 JAX_COMPILATION_CACHE_DIR names another)

``<group>`` is ``fold<k>-seed<s>`` for ``loso`` (fold k holds out the k-th session; the seed is
the training seed) and ``seed<s>`` for ``paper`` (the seed draws the 80/20 split *and* seeds
training, as in the lineage code).

For every group the teacher is trained with cross-entropy (``train_lib.train_and_evaluate``)
and each requested student is distilled from it; training scores the last epoch on the held-out
utterances itself (``eval_lib``, the scoring path ``eval.py`` uses too) and writes the run's
``results.json``, so nothing is evaluated twice. A run is *finished* when its ``results.json``
exists and records the same training config; re-running the same command skips finished runs
and resumes the others (training itself resumes from its last checkpoint). Each run holds its
workdir's lock while it trains, so two runners cannot write into one run.

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

Modules: ``spec`` (settings, plan, finished runs), ``runner`` (run, reproduce), ``report``
(summaries), ``cli`` (the command line).
"""

from dkd_jax.experiment import cli
from dkd_jax.experiment.cli import main
from dkd_jax.experiment.report import (
    best_epoch_scores,
    build_summary,
    format_summary_markdown,
    format_summary_text,
    summarize_rows,
    validation_scores,
    write_summary,
)
from dkd_jax.experiment.runner import (
    compare_runs,
    execute_run,
    reproduce,
    run_experiment,
)
from dkd_jax.experiment.spec import (
    CACHE_DIR,
    EXPERIMENT_FILE,
    MODEL_LABELS,
    PAPER_SEEDS,
    STUDENT_LOSSES,
    SUMMARY_JSON,
    SUMMARY_MD,
    ExperimentError,
    ExperimentSpec,
    RunPlan,
    is_finished,
    make_spec,
    plan_runs,
)

__all__ = [
    "CACHE_DIR",
    "EXPERIMENT_FILE",
    "MODEL_LABELS",
    "PAPER_SEEDS",
    "STUDENT_LOSSES",
    "SUMMARY_JSON",
    "SUMMARY_MD",
    "ExperimentError",
    "ExperimentSpec",
    "RunPlan",
    "best_epoch_scores",
    "build_summary",
    "cli",
    "compare_runs",
    "execute_run",
    "format_summary_markdown",
    "format_summary_text",
    "is_finished",
    "main",
    "make_spec",
    "plan_runs",
    "reproduce",
    "run_experiment",
    "summarize_rows",
    "validation_scores",
    "write_summary",
]
