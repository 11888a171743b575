"""Checkpoints: a thin orbax wrapper and ``restore_run`` for evaluation.

This module owns the on-disk layout of checkpoints in a workdir::

    checkpoints/<step>/        the last ``train.keep_checkpoints`` training states (orbax)
    checkpoints_best/<step>/   the state with the best validation UA (when a validation split
                               exists; never chosen on the test set)

Each orbax step directory holds two items: ``state`` (the student's or teacher's
``TrainState``: step, params, batch_stats, optimiser state, bad_step; never a frozen teacher)
and ``meta`` (JSON: epoch, step, best validation UA so far, ...). Saving is synchronous: a
process killed mid-save leaves orbax's temporary directory, which is ignored on restore, so the
last *complete* checkpoint is always the one that resumes.

:func:`restore_run` rebuilds what evaluation needs from a workdir alone: the resolved config,
the Flax model, its variables (``params`` + ``batch_stats``) and the step.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from dkd_jax import config as config_lib

__all__ = ["BEST_DIR", "CHECKPOINT_DIR", "Checkpointer", "RestoredRun", "restore_run"]

CHECKPOINT_DIR = "checkpoints"
BEST_DIR = "checkpoints_best"
CONFIG_FILE = "config.json"
NORMALIZATION_FILE = "normalization.json"


class Checkpointer:
    """Saves and restores (state pytree, JSON meta) pairs under one directory.

    Args:
      directory: where the step directories go (created on first save).
      max_to_keep: how many of the most recent steps to keep.
      read_only: only restore (evaluation while training may still be writing).
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int, read_only: bool = False):
        self.directory = Path(directory).absolute()
        self.read_only = read_only
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=not read_only,
            enable_async_checkpointing=False,
            # A reader must never delete the temporary directory of a save in progress.
            cleanup_tmp_directories=not read_only,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest complete step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """All complete steps, ascending."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Saves ``state`` (a pytree of host or single-device arrays) and ``meta`` at ``step``;
        overwrites an existing checkpoint of the same step."""
        if self.read_only:
            raise ValueError(f"{self.directory}: opened read-only")
        state = jax.device_get(state)
        if step in self._manager.all_steps():
            self._manager.delete(step)
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))
            ),
            force=True,
        )
        self._manager.wait_until_finished()

    def restore(self, step: int | None = None, *, target: Any = None) -> tuple[Any, dict]:
        """Restores (state, meta) of ``step`` (default the latest).

        Args:
          step: which step; None = latest.
          target: a pytree of arrays or ShapeDtypeStructs with the saved structure (exact types
            come back); None restores nested dicts of numpy arrays.

        Raises:
          FileNotFoundError: no such checkpoint (the message lists the available steps).
        """
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"{self.directory}: no checkpoints")
            step = steps[-1]
        if step not in steps:
            raise FileNotFoundError(f"{self.directory}: no checkpoint at step {step}; have {steps}")
        if target is None:
            state_args = ocp.args.StandardRestore()
        else:
            abstract = jax.tree.map(_abstract, target)
            state_args = ocp.args.StandardRestore(abstract)
        out = self._manager.restore(
            step, args=ocp.args.Composite(state=state_args, meta=ocp.args.JsonRestore())
        )
        return jax.device_get(out["state"]), dict(out["meta"])

    def close(self) -> None:
        """Releases orbax resources."""
        self._manager.close()


def _abstract(x):
    x = np.asarray(x) if not isinstance(x, jax.ShapeDtypeStruct) else x
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


@dataclasses.dataclass
class RestoredRun:
    """A trained run, ready for evaluation.

    Attributes:
      config: the run's resolved Config.
      model: the Flax MACNN that was trained (teacher or student, per config.model.role).
      variables: {"params", "batch_stats"} (numpy, host).
      step: the restored step.
      normalization: the run's feature normalisation (``input_pipeline.normalize_arrays``).
      data_info: content hash, feature config, label names of the training data (split.json).
    """

    config: config_lib.Config
    model: Any
    variables: dict[str, Any]
    step: int
    normalization: dict[str, Any] = dataclasses.field(default_factory=lambda: {"mode": "none"})
    data_info: dict[str, Any] = dataclasses.field(default_factory=dict)


def load_config(workdir: str | os.PathLike) -> config_lib.Config:
    """The resolved config of a workdir (ValueError naming the file when missing/bad)."""
    path = Path(workdir) / CONFIG_FILE
    if not path.exists():
        raise ValueError(f"{path}: missing (not a training workdir, or the run never started)")
    return config_lib.loads(path.read_text(), source=str(path))


def restore_run(
    workdir: str | os.PathLike, *, step: int | None = None, best: bool = False
) -> RestoredRun:
    """Loads a run for evaluation: config, model, variables, step.

    Args:
      workdir: a training workdir.
      step: which checkpoint (default: the latest, i.e. the end of training).
      best: restore the best-by-validation-UA checkpoint instead (needs a validation split).

    Raises:
      ValueError: not a workdir, or no such checkpoint (the message says what exists).
    """
    from dkd_jax import protocols, train_lib  # train_lib imports this module

    workdir = Path(workdir)
    cfg = load_config(workdir)
    _, data_info = protocols.load_split_file(workdir / protocols.SPLIT_FILE)
    num_classes = len(data_info.get("label_names", [])) or 4
    role = cfg.model.role
    model = train_lib.create_model(getattr(cfg.model, role), num_classes=num_classes)
    directory = workdir / (BEST_DIR if best else CHECKPOINT_DIR)
    if not directory.exists():
        what = "best-by-validation checkpoint (no validation split?)" if best else "checkpoints"
        raise ValueError(f"{directory}: no {what}")
    ckpt = Checkpointer(directory, max_to_keep=1, read_only=True)
    try:
        state, meta = ckpt.restore(step)
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None
    finally:
        ckpt.close()
    variables = {"params": state["params"], "batch_stats": state.get("batch_stats", {})}
    norm_path = workdir / NORMALIZATION_FILE
    normalization = json.loads(norm_path.read_text()) if norm_path.exists() else {"mode": "none"}
    return RestoredRun(
        config=cfg,
        model=model,
        variables=variables,
        step=int(meta.get("step", state["step"])),
        normalization=normalization,
        data_info=data_info,
    )
