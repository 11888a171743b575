"""The host side of the training loop: metric sums, log records, evaluation and checkpoints.

The compiled step returns per-step metric sums; :class:`LoopContext` (one per run) adds them
into float64 accumulators (:class:`MetricSums`, checkpointed so that a resumed run continues the
same sums bit for bit), writes ``metrics.jsonl``/TensorBoard records every
``train.log_every_steps`` steps and at each epoch end, evaluates the held-out sets
(``eval_lib.score_eval_set``, the one scoring path), keeps the best-by-validation checkpoint,
saves checkpoints at the configured cadence, and stops on a non-finite loss with the last good
state saved.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from dkd_jax import checkpointing, distributed, eval_lib, metrics, objective, run_dir
from dkd_jax import config as config_lib

__all__ = [
    "METRIC_KEYS",
    "Heartbeat",
    "LoopContext",
    "MetricSums",
    "NonFiniteLossError",
    "RunClock",
    "SimulatedAbort",
    "TrainingError",
    "progress_bar",
]

METRIC_KEYS = ("count", "loss", "ce", "kd", "tckd", "nckd", "grad_norm", "nonfinite")
"""The scalar metrics of one step (sums over the real segments of the global batch, except
grad_norm and the nonfinite flag); the step also returns a segment confusion matrix."""


class TrainingError(RuntimeError):
    """A training problem with a one-line explanation (the CLI prints it without traceback)."""


class NonFiniteLossError(TrainingError):
    """A loss, gradient or update became NaN/inf; the last good state was checkpointed."""

    def __init__(self, message: str, *, step: int, epoch: int, batch: int):
        super().__init__(message)
        self.step, self.epoch, self.batch = step, epoch, batch


class SimulatedAbort(TrainingError):
    """Raised by ``train.debug_abort_after_steps`` (tests of exact resume)."""


def progress_bar(total: int, initial: int, enabled: bool):
    """A tqdm bar over steps (only on a terminal, only on process 0)."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="step",
        dynamic_ncols=True,
        disable=not (enabled and sys.stderr.isatty() and jax.process_index() == 0),
    )


class MetricSums:
    """Float64 running sums of per-step metrics (checkpointed, so a resumed run continues the
    same sums bit for bit)."""

    def __init__(self, num_classes: int, data: dict | None = None):
        self.num_classes = num_classes
        self.sums = {k: 0.0 for k in METRIC_KEYS}
        self.confusion = np.zeros((num_classes, num_classes), np.float64)
        self.steps = 0
        if data:
            self.sums.update({k: float(v) for k, v in data["sums"].items()})
            self.confusion = np.asarray(data["confusion"], np.float64)
            self.steps = int(data["steps"])

    def add(self, m: dict) -> None:
        for k in METRIC_KEYS:
            self.sums[k] += float(m[k])
        self.confusion += np.asarray(m["confusion"], np.float64)
        self.steps += 1

    def means(self) -> dict[str, float]:
        c = max(self.sums["count"], 1.0)
        out = {k: self.sums[k] / c for k in ("loss", "ce", "kd", "tckd", "nckd")}
        out["grad_norm"] = self.sums["grad_norm"] / max(self.steps, 1)
        cm = self.confusion.astype(np.int64)
        if cm.sum() > 0:
            out["wa"] = metrics.weighted_accuracy(cm)
            out["ua"] = metrics.unweighted_accuracy(cm)
        return out

    def to_json(self) -> dict:
        return {"sums": dict(self.sums), "confusion": self.confusion.tolist(), "steps": self.steps}


class Heartbeat:
    """Prints where a run is (epoch, step, running loss) every ``seconds`` from a background
    thread, so a log without progress bars never goes quiet for long (not even while XLA
    compiles). Use as a context manager; :meth:`update` is called by the loop.

    Args:
      label: what is running (e.g. "fold0-seed0/teacher").
      seconds: the interval.
      total_steps, num_epochs: for "step s/total, epoch e/epochs".
      stream: where the lines go (default stdout).
    """

    def __init__(
        self, label: str, seconds: float, *, total_steps: int = 0, num_epochs: int = 0, stream=None
    ):
        self.label, self.seconds = label, float(seconds)
        self.total_steps, self.num_epochs = total_steps, num_epochs
        self.stream = stream or sys.stdout
        self._state: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="heartbeat")
        self._t0 = time.monotonic()

    def update(self, **state: Any) -> None:
        self._state = dict(state)

    def line(self) -> str:
        s = self._state
        where = (
            f"epoch {s['epoch']}/{self.num_epochs}, step {s['step']}/{self.total_steps}, "
            f"running loss {s['loss']:.4f}"
            if s
            else "preparing (data, compilation)"
        )
        return f"      ... {self.label}: {where} ({time.monotonic() - self._t0:.0f} s)"

    def _run(self) -> None:
        while not self._stop.wait(self.seconds):
            self.stream.write(self.line() + "\n")  # one write: whole lines between threads
            self.stream.flush()

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@dataclasses.dataclass
class LoopContext:
    """Host-side state of a run's loop: metric sums, logging, evaluation, checkpoints."""

    cfg: config_lib.Config
    workdir: Path
    spe: int
    total_steps: int
    schedule: Any
    logger: run_dir.MetricsWriter
    ckpt: checkpointing.Checkpointer
    best_ckpt: checkpointing.Checkpointer | None
    eval_sets: list
    eval_model: Any
    devices: tuple
    interval: MetricSums
    epoch_sums: MetricSums
    best: dict
    num_classes: int
    teacher: bool
    weights: dict
    on_device: bool
    last_train: dict = dataclasses.field(default_factory=dict)
    last_scores: dict = dataclasses.field(default_factory=dict)
    heartbeat: Heartbeat | None = None
    _last_ckpt_step: int = -1

    def consume(self, per_step: list, first_step: int, r_state, seconds: float, bar) -> None:
        """Adds per-step metrics (steps first_step, first_step+1, ...), logs intervals, and
        stops on a non-finite loss."""
        log_every = self.cfg.train.log_every_steps
        for i, m in enumerate(per_step):
            s = first_step + i + 1  # steps done after this one
            if float(m["nonfinite"]) > 0:
                self._nonfinite(r_state)
            self.interval.add(m)
            self.epoch_sums.add(m)
            if s % log_every == 0 or s % self.spe == 0:
                means = self.interval.means()
                epoch = (s - 1) // self.spe + 1
                lr = float(self.schedule(s - 1))
                kdw = (
                    float(objective.kd_ramp(s - 1, self.weights["warmup_epochs"], self.spe))
                    if self.teacher
                    else 0.0
                )
                rec = {
                    "event": "train",
                    "step": s,
                    "epoch": epoch,
                    "lr": lr,
                    "kd_weight": kdw,
                    **{k: means[k] for k in ("loss", "ce", "kd", "tckd", "nckd", "grad_norm")},
                }
                self.logger.log(
                    rec,
                    {
                        "train/loss": means["loss"],
                        "train/ce": means["ce"],
                        "train/tckd": means["tckd"],
                        "train/nckd": means["nckd"],
                        "train/kd": means["kd"],
                        "train/lr": lr,
                        "train/kd_weight": kdw,
                        "train/grad_norm": means["grad_norm"],
                    },
                )
                self.interval = MetricSums(self.num_classes)
        n = len(per_step)
        if n:
            epoch, loss = (first_step + n - 1) // self.spe + 1, self.epoch_sums.means()["loss"]
            bar.update(n)
            bar.set_postfix(
                epoch=epoch, loss=f"{loss:.4f}", steps_s=f"{n / max(seconds, 1e-9):.1f}"
            )
            if self.heartbeat is not None:
                self.heartbeat.update(epoch=epoch, step=first_step + n, loss=loss)

    def _nonfinite(self, r_state) -> None:
        state = distributed.unreplicate(r_state)
        bad = int(state.bad_step)
        epoch, batch = divmod(bad, self.spe)
        good = state.replace(bad_step=np.int32(-1))
        self.save(None, bad, state=good)
        self.logger.log({"event": "nonfinite", "step": bad, "epoch": epoch + 1, "batch": batch})
        where = self.workdir / run_dir.CHECKPOINT_DIR
        if bad == 0:
            kept = (
                f"no good state exists yet: the very first step failed (the untrained initial "
                f"state is in {where})"
            )
        else:
            kept = f"the last good state (after {bad} steps) is saved in {where}"
        raise NonFiniteLossError(
            f"non-finite loss, gradient or update at step {bad} (epoch {epoch + 1}, batch {batch} "
            f"of {self.spe}); {kept}. Lower optim.learning_rate or set optim.grad_clip_norm, "
            "then rerun with --overwrite",
            step=bad,
            epoch=epoch + 1,
            batch=batch,
        )

    def run_eval(self, state, *, log: bool, step: int | None = None, epoch: int | None = None):
        """Scores every held-out set (remembered in ``last_scores``); logs "eval" records."""
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        if self.eval_sets:  # one copy on the devices for every set
            variables = eval_lib.replicate_variables(variables, self.devices)
        out = {}
        for es in self.eval_sets:
            scores = eval_lib.score_eval_set(
                self.eval_model,
                variables,
                es,
                batch_size=self.cfg.data.eval_batch_size,
                devices=self.devices,
                replicated=True,
            )
            res = eval_lib.eval_summary(scores, es, num_classes=self.num_classes)
            self.last_scores[es.name] = scores
            out[es.name] = res
            if log:
                self.logger.log(
                    {"event": "eval", "split": es.name, "step": step, "epoch": epoch, **res},
                    {f"{es.name}/wa": res["wa"], f"{es.name}/ua": res["ua"]},
                )
        return out

    def end_epoch(self, r_state, step: int) -> dict:
        """Epoch-end work: train summary, evaluation, best and periodic checkpoints."""
        if step % self.spe:
            return {}
        epoch = step // self.spe
        means = self.epoch_sums.means()
        self.last_train = {"epoch": epoch, **means}
        self.logger.log(
            {"event": "epoch", "step": step, "epoch": epoch, **means},
            {"train/wa": means.get("wa"), "train/ua": means.get("ua")},
        )
        self.epoch_sums = MetricSums(self.num_classes)
        every = self.cfg.train.eval_every_epochs
        last = step >= self.total_steps
        result = {}
        state = None
        if (every and epoch % every == 0) or last:
            state = distributed.unreplicate(r_state)
            result = self.run_eval(state, log=True, step=step, epoch=epoch)
            val = result.get("validation")
            if val is not None and self.best_ckpt is not None:
                if self.best.get("ua") is None or val["ua"] > self.best["ua"]:
                    self.best = {"ua": val["ua"], "step": step, "epoch": epoch}
                    self.best_ckpt.save(step, state, self._meta(step))
        ck_every = self.cfg.train.checkpoint_every_steps
        if self.on_device:  # the first epoch end at or after each multiple
            crossed = ck_every and (step // ck_every > (step - self.spe) // ck_every)
        else:  # saved mid-epoch at the exact multiples
            crossed = ck_every and step % ck_every == 0
        if last or crossed or (ck_every == 0 and result):
            self.save(r_state, step, state=state)
        return result

    def _meta(self, step: int) -> dict:
        return {
            "step": step,
            "epoch": step // self.spe,
            "steps_per_epoch": self.spe,
            "best": self.best,
            "interval": self.interval.to_json(),
            "epoch_sums": self.epoch_sums.to_json(),
            "last_train": self.last_train,
        }

    def save(self, r_state, step: int, *, state=None) -> None:
        if step == self._last_ckpt_step:
            return
        if state is None:
            state = distributed.unreplicate(r_state)
        self.ckpt.save(step, state, self._meta(step))
        self._last_ckpt_step = step


class RunClock:
    """Wall time of a run, of its set-up (phases 1-3), and the time JAX spent tracing, lowering
    and compiling during it (``jax.monitoring`` compile events; a persistent-cache hit costs
    only the tracing and the cache read)."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.setup_seconds = 0.0
        self.compile_seconds = 0.0
        self.thread = threading.get_ident()  # runs on other threads compile for themselves

    def _listener(self, name: str, seconds: float, **_) -> None:
        if name.startswith("/jax/core/compile/") and threading.get_ident() == self.thread:
            self.compile_seconds += seconds

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listener)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def timing(self) -> dict[str, float]:
        return {
            "seconds": round(self.elapsed(), 3),
            "setup_seconds": round(self.setup_seconds, 3),
            "compile_seconds": round(self.compile_seconds, 3),
        }
