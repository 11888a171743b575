"""Side-by-side benchmark: dkd-jax's compiled steps against a PyTorch MACNN of the same shape.

For every case (input shape × batch × operation) both sides run **in one process, interleaved**
(ours, theirs, ours, theirs, … for ``--rounds`` rounds) on the same inputs, starting from the
same weights (the Flax initialisation ported to PyTorch, ``bench/torch_macnn.py``):

* ``ce``: a student (4 heads × 64) cross-entropy training step (forward, backward, Adam with
  coupled L2 1e-6, BatchNorm statistics updated);
* ``dkd``: a distillation step: the frozen teacher's (8 heads × 256) eval-mode forward, the
  student's forward/backward on CE + ramp·DKD (α 1, β 8, T 4, ramp 1/5 as in the first epoch)
  and an Adam update;
* ``teacher_ce`` (only with ``--ops``): the same cross-entropy step for the teacher (8 heads ×
  256), which trains every fold's teacher (the largest part of the demo's time);
* ``inference``: student eval-mode logits of one batch, host arrays in and out (the weights
  already on the device on both sides: dkd-jax's replicated once, as its evaluation does).

"Ours" is the project's real compiled step, built only through dkd_jax's public
functions in :func:`build_ours` (the one place to change when that API changes). Its batch is
put on the device before timing, as the training loop's background thread does; its first call
includes tracing and compilation (``first_call_s``; building the state is ``build_s``).
"Theirs" is plain PyTorch eager code, as a PyTorch user would write it.

Per case and side: median, p10, p90, mean and min step time of ``rounds × steps`` timed steps
after ``--warmup`` untimed ones, the per-round medians, the CPU time / wall time of the timed
steps (``cpu_util``: process CPU time while that side ran, so ≤ threads by construction when it
is pinned), and the losses of the first and last step (both sides see the same batch every step,
so the two curves agree to float precision: a check that both do the same work). The ratio
``speedup = theirs_median / ours_median`` (> 1: dkd-jax is faster), also per round.

Threads: every thread budget (``--threads 1,2``) runs in its own child process whose
environment is fixed before JAX or PyTorch is imported: ``OMP_NUM_THREADS`` /
``MKL_NUM_THREADS`` = N and ``OMP_WAIT_POLICY=PASSIVE`` (PyTorch's OpenMP workers sleep instead of
spinning: on a shared machine spinning workers collapse, and they would steal the other side's
CPU), ``torch.set_num_threads(N)``, and for XLA:CPU — which in jaxlib 0.10.2 has no
intra-op thread-count flag (``intra_op_parallelism_threads`` is not an XLA flag; an unknown
``--xla_*`` flag is fatal and a bare word is ignored) and sizes its thread pool from the CPUs the
process may run on — CPU affinity to N cores when N is below the cores available, plus
``--xla_cpu_multi_thread_eigen=false`` at N = 1. The affinity applies to both sides (one
process). The JSON records all of it and the load average before and after every case.

``--split-cpu``: dkd-jax splits the CPU into one JAX device per thread of the budget, as
``train.py --cpu-devices N`` does, so its step is data-parallel over the cores (each device takes
batch / N segments; BatchNorm statistics and gradients summed over the devices). By itself
XLA:CPU gains only 1.2-1.3x from a second thread on these steps. At one thread nothing changes.

  python bench/compare_torch.py --quick                  # a few minutes on 2 CPU cores
  python bench/compare_torch.py --threads 1,2 --out bench/results/compare_torch_cpu.json
  python bench/compare_torch.py --shapes mfcc26 --batches 32 --ops ce,dkd
  python bench/compare_torch.py --threads 2 --split-cpu   # dkd-jax on 2 CPU devices
  python bench/compare_torch.py --device gpu --out bench/results/compare_torch_gpu.json

``--device gpu`` times CUDA PyTorch against ``jax[cuda12]`` (batches 32, 256, 1024 by default;
``torch.backends.cudnn.benchmark`` on, a ``torch.cuda.synchronize()`` after every PyTorch step,
no affinity). It needs ``pip install -e '.[cuda12]'`` and a CUDA build of torch (see README).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROG = "compare_torch"
SHAPES = {"mfcc26": (26, 63), "logmel40": (40, 200)}
OPS = ("ce", "dkd", "inference", "teacher_ce")
DEFAULT_OPS = ("ce", "dkd", "inference")  # the grid; teacher_ce on request
STEPS_PER_EPOCH = 1000  # the DKD ramp is then 1/warmup_epochs = 0.2 for every timed step


def _fail(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


@dataclasses.dataclass
class Side:
    """One side of a case: ``run()`` does one step (or prediction) and returns when its results
    are ready; ``loss()`` is the last step's mean loss (nan for inference); ``variables()`` the
    current student variables as host arrays (Flax structure); ``logits()`` the last prediction
    (inference only)."""

    run: Callable[[], None]
    loss: Callable[[], float]
    variables: Callable[[], dict]
    teacher_variables: dict | None = None
    notes: str = ""
    logits: Callable[[], Any] = lambda: None  # inference: the last prediction


# --------------------------------------------------------------------------------------------
# Ours: the one adapter onto dkd_jax's training step (public API only)
# --------------------------------------------------------------------------------------------


def build_ours(
    op: str, features, labels, *, seed: int = 0, devices=None, conv_algorithm: str = "xla"
) -> Side:
    """dkd-jax's own step for one case, built through its public training functions.

    Args:
      op: "ce", "dkd", "inference" or "teacher_ce" (the trained model is then the teacher).
      features: [B, F, T] float32 host batch; labels: [B] int32.
      seed: initialisation seed of the trained model (and, + 1, the frozen teacher).
      devices: JAX devices of the step (default: the first local device).
      conv_algorithm: the trained model's ``conv_algorithm`` ("xla", "taps_forward" or
        "taps").

    Returns:
      A :class:`Side` whose ``run`` is one call of the compiled step on the device-resident
      batch (``pmap`` over ``devices`` today), blocked until its state and metrics are ready.
    """
    import jax
    import numpy as np

    from dkd_jax import config as config_lib
    from dkd_jax import distributed, eval_lib, models, objective, train_state, train_step

    cfg = config_lib.get_config("default")
    trained = cfg.model.teacher if op == "teacher_ce" else cfg.model.student
    trained.conv_algorithm = conv_algorithm  # a frozen (DKD) teacher keeps the default
    devices = tuple(devices or jax.local_devices()[:1])
    shape = tuple(features.shape[1:])
    model = models.create_model(trained, num_classes=4, batch_norm_axis_name=distributed.AXIS)
    teacher = models.create_model(cfg.model.teacher, num_classes=4) if op == "dkd" else None
    spec = train_step.StepSpec(
        teacher="live" if op == "dkd" else "none",
        augment=dataclasses.astuple(cfg.augment),
        num_classes=4,
    )
    fns = train_step.make_train_functions(model, teacher, cfg.optim, spec, devices)
    state = train_state.create_train_state(jax.random.PRNGKey(seed), model, fns.tx, shape)
    t_vars = None
    if teacher is not None:
        t_vars = train_state.init_variables(jax.random.PRNGKey(seed + 1), teacher, shape)

    def first(tree):
        return jax.tree.map(lambda x: np.asarray(x)[0], tree)

    if op == "inference":
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        eval_model = models.create_model(cfg.model.student, num_classes=4)
        batch = len(features)
        # The weights go to the devices once, as the training loop's evaluation puts them once
        # for all its batches and sets (and as PyTorch's model sits on its device); the host
        # batch goes in and the logits come out in every timed call.
        on_devices = eval_lib.replicate_variables(variables, devices)

        out = {}

        def predict():
            out["logits"] = eval_lib.predict_logits(
                eval_model,
                on_devices,
                features,
                batch_size=batch,
                devices=devices,
                replicated=True,
            )

        nan = float("nan")
        return Side(
            predict,
            lambda: nan,
            lambda: variables,
            None,
            "predict_logits",
            lambda: out.get("logits"),
        )

    d = len(devices)
    host = {"features": features, "labels": labels, "mask": np.ones(len(labels), bool)}
    host = {k: v.reshape(d, len(labels) // d, *v.shape[1:]) for k, v in host.items()}
    batch = jax.device_put(host, distributed.device_axis_sharding(devices))
    weights = train_step.hyper(
        objective.loss_weights("dkd" if op == "dkd" else "ce", cfg.kd),
        steps_per_epoch=STEPS_PER_EPOCH,
        total_steps=50 * STEPS_PER_EPOCH,
    )
    r_teacher = distributed.replicate(t_vars, devices) if t_vars is not None else None
    box = {"state": distributed.replicate(state, devices), "metrics": None}
    key = jax.random.PRNGKey(seed)

    def step():
        box["state"], box["metrics"] = fns.p_step(box["state"], batch, r_teacher, weights, key)
        jax.block_until_ready((box["state"], box["metrics"]))

    def loss():
        m = first(box["metrics"])
        return float(m["loss"] / m["count"])

    def variables():
        s = box["state"]
        return {"params": first(s.params), "batch_stats": first(s.batch_stats)}

    return Side(step, loss, variables, t_vars, f"p_step over {d} device(s)")


# --------------------------------------------------------------------------------------------
# Theirs: PyTorch
# --------------------------------------------------------------------------------------------


def build_theirs(op: str, features, labels, ours: Side, *, device: str) -> Side:
    """The PyTorch side of a case, starting from ours' initial variables."""
    import numpy as np
    import torch
    import torch_macnn as tm

    from dkd_jax import config as config_lib

    cfg = config_lib.get_config("default")
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    trained = "teacher" if op == "teacher_ce" else "student"
    model = tm.load_flax_variables(tm.build(trained), ours.variables()).to(dev)
    if op == "inference":
        out = {}

        def predict():
            x = torch.from_numpy(features).to(dev)
            out["logits"] = tm.predict(model, x).cpu().numpy()

        nan = float("nan")
        return Side(
            predict,
            lambda: nan,
            lambda: tm.flax_variables(model),
            logits=lambda: out.get("logits"),
        )
    x, y = torch.from_numpy(features).to(dev), torch.from_numpy(labels.astype(np.int64)).to(dev)
    o = cfg.optim
    opt = tm.make_optimizer(
        model, lr=o.learning_rate, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps
    )
    teacher = None
    if op == "dkd":
        teacher = tm.load_flax_variables(tm.build("teacher"), ours.teacher_variables).to(dev)
        teacher.requires_grad_(False)
    box = {"loss": None, "step": 0}
    kd = cfg.kd

    def step():
        if teacher is None:
            box["loss"] = tm.ce_step(model, opt, x, y)
        else:
            ramp = tm.kd_ramp(box["step"], kd.warmup_epochs, STEPS_PER_EPOCH)
            box["loss"] = tm.dkd_step(
                model, teacher, opt, x, y, ramp=ramp, ce_weight=kd.ce_weight,
                alpha=kd.alpha, beta=kd.beta, temperature=kd.temperature,
            )  # fmt: skip
        box["step"] += 1
        sync()

    return Side(step, lambda: float(box["loss"]), lambda: tm.flax_variables(model))


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def _timed(run: Callable[[], None], n: int) -> tuple[list[float], float, float]:
    """n calls; (per-call seconds, process CPU seconds, wall seconds)."""
    times = []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return times, time.process_time() - cpu0, time.perf_counter() - wall0


def _stats(times: list[float]) -> dict[str, float]:
    import numpy as np

    t = np.asarray(times)
    return {
        "median_ms": round(1e3 * float(np.median(t)), 3),
        "p10_ms": round(1e3 * float(np.percentile(t, 10)), 3),
        "p90_ms": round(1e3 * float(np.percentile(t, 90)), 3),
        "mean_ms": round(1e3 * float(t.mean()), 3),
        "min_ms": round(1e3 * float(t.min()), 3),
    }


def run_case(
    shape_name,
    batch,
    op,
    *,
    rounds,
    steps,
    warmup,
    device,
    progress,
    jax_devices=None,
    conv_algorithm="xla",
) -> dict:
    """Both sides of one case, interleaved; see the module docstring for the fields."""
    import numpy as np

    freq, frames = SHAPES[shape_name]
    rng = np.random.default_rng(0)
    features = rng.normal(size=(batch, freq, frames)).astype(np.float32)
    labels = (np.arange(batch) % 4).astype(np.int32)
    load_before = os.getloadavg()
    sides: dict[str, Any] = {}
    built: dict[str, Side] = {}
    for name in ("ours", "theirs"):  # both from the same initial weights, before any step
        t0 = time.perf_counter()
        if name == "ours":
            built[name] = build_ours(
                op, features, labels, devices=jax_devices, conv_algorithm=conv_algorithm
            )
        else:
            built[name] = build_theirs(op, features, labels, built["ours"], device=_torch(device))
        sides[name] = {"build_s": round(time.perf_counter() - t0, 3), "notes": built[name].notes}
    for name, side in built.items():
        t0 = time.perf_counter()
        side.run()
        sides[name]["first_call_s"] = round(time.perf_counter() - t0, 3)
        sides[name]["loss_first_step"] = side.loss()
        for _ in range(warmup):
            side.run()
        sides[name].update(times=[], round_medians_ms=[], cpu_s=0.0, wall_s=0.0)
    for r in range(rounds):
        for name in ("ours", "theirs"):
            times, cpu, wall = _timed(built[name].run, steps)
            entry = sides[name]
            entry["times"] += times
            entry["round_medians_ms"].append(round(1e3 * statistics.median(times), 3))
            entry["cpu_s"] += cpu
            entry["wall_s"] += wall
            progress(f"{shape_name} b{batch} {op} round {r + 1}/{rounds} {name}: "
                     f"median {1e3 * statistics.median(times):.1f} ms")  # fmt: skip
    for name, entry in sides.items():
        entry.update(_stats(entry.pop("times")))
        entry["timed_steps"] = rounds * steps
        entry["cpu_util"] = round(entry.pop("cpu_s") / max(entry.pop("wall_s"), 1e-9), 3)
        entry["loss_last_step"] = built[name].loss()
    ours, theirs = sides["ours"], sides["theirs"]
    return {
        "shape": shape_name,
        "input": [freq, frames],
        "batch": batch,
        "op": op,
        "ours": ours,
        "theirs": theirs,
        "speedup": round(theirs["median_ms"] / ours["median_ms"], 3),
        "first_loss_rel_diff": _rel_diff(ours["loss_first_step"], theirs["loss_first_step"]),
        "speedup_per_round": [
            round(t / o, 3)
            for o, t in zip(ours["round_medians_ms"], theirs["round_medians_ms"], strict=True)
        ],
        "load_before": [round(v, 2) for v in load_before],
        "load_after": [round(v, 2) for v in os.getloadavg()],
    }


def _rel_diff(a: float, b: float) -> float | None:
    """|a − b| / |a| (None for inference, whose loss is nan)."""
    if a != a or b != b:
        return None
    return float(f"{abs(a - b) / max(abs(a), 1e-12):.2e}")


def _torch(device: str) -> str:
    return "cuda" if device == "gpu" else "cpu"


# --------------------------------------------------------------------------------------------
# One thread budget (a child process) and the driver
# --------------------------------------------------------------------------------------------


def configure_threads(threads: int, device: str, extra_xla_flags: str) -> dict:
    """Sets the environment and affinity of this process; must run before JAX/torch import."""
    cores = sorted(os.sched_getaffinity(0))
    pinned = None
    if device == "cpu" and threads < len(cores):
        pinned = cores[:threads]
        os.sched_setaffinity(0, pinned)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    if device == "cpu" and threads == 1:
        flags.append("--xla_cpu_multi_thread_eigen=false")
    flags += extra_xla_flags.split()
    os.environ["XLA_FLAGS"] = " ".join(flags)
    os.environ["JAX_PLATFORMS"] = "cpu" if device == "cpu" else "cuda,cpu"
    os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)  # every first call compiles
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return {
        "threads": threads,
        "cores_available": len(cores),
        "affinity": pinned or cores,
        "pinned": pinned is not None,
        "OMP_NUM_THREADS": os.environ["OMP_NUM_THREADS"],
        "OMP_WAIT_POLICY": os.environ["OMP_WAIT_POLICY"],
        "XLA_FLAGS": os.environ["XLA_FLAGS"],
    }


def _versions(device: str) -> dict:
    import benchjson  # bench/ is on sys.path (child() puts it there)
    import jax
    import jaxlib
    import torch

    info = {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "torch": torch.__version__,
        "jax_device": str(jax.local_devices()[0]),
        "jax_device_kind": jax.local_devices()[0].device_kind,
        "jax_devices": len(jax.local_devices()),
        "cpu": benchjson.cpu_model(),
        "host_cpu_count": os.cpu_count(),
    }
    if device == "gpu":
        info["torch_device"] = torch.cuda.get_device_name(0)
        info["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    return info


def child(args) -> dict:
    """Runs every case under one thread budget and returns its JSON."""
    threads = configure_threads(args.threads_child, args.device, args.xla_flags)
    sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
    from dkd_jax import host_memory

    # Process-wide, so both sides get it (PyTorch's CPU tensors come from the same malloc).
    threads["host_memory"] = host_memory.configure()
    if args.split_cpu:  # CPU only (_resolve refuses it with --device gpu)
        from dkd_jax import distributed

        distributed.use_cpu_devices(args.threads_child)  # before JAX starts its backends
    import jax
    import torch

    torch.set_num_threads(args.threads_child)
    if args.device == "gpu":
        if not torch.cuda.is_available():
            _fail("--device gpu: this torch has no CUDA (install a CUDA build, see README)")
        if jax.default_backend() != "gpu":
            _fail("--device gpu: JAX sees no GPU (pip install -e '.[cuda12]')")
        torch.backends.cudnn.benchmark = True
    # ours: one device, or (--split-cpu) every CPU device, one per thread of the budget
    jax_devices = jax.local_devices() if args.split_cpu else jax.local_devices()[:1]
    threads["jax_step_devices"] = len(jax_devices)
    threads["torch_num_threads"] = torch.get_num_threads()
    threads["torch_num_interop_threads"] = torch.get_num_interop_threads()
    out = {"threads": threads, "versions": _versions(args.device), "cases": []}
    out["load_start"] = [round(v, 2) for v in os.getloadavg()]
    t0 = time.perf_counter()
    for shape_name in args.shapes:
        for batch in args.batches:
            for op in args.ops:
                case = run_case(
                    shape_name, batch, op, rounds=args.rounds, steps=args.steps,
                    warmup=args.warmup, device=args.device, progress=_progress,
                    jax_devices=jax_devices,
                    conv_algorithm=args.conv_algorithm,
                )  # fmt: skip
                out["cases"].append(case)
                if args.cases_log:
                    with open(args.cases_log, "a") as log:
                        log.write(json.dumps({"threads": args.threads_child, **case}) + "\n")
                _progress(f"threads {args.threads_child}: {shape_name} b{batch} {op}: "
                          f"speedup {case['speedup']} ({case['speedup_per_round']})")  # fmt: skip
    out["load_end"] = [round(v, 2) for v in os.getloadavg()]
    out["threads"]["process_threads_by_name"] = _thread_names()
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    out["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def _thread_names() -> dict[str, int]:
    """This process's threads by name (XLA:CPU's intra-op pool threads are ``tf_XLAEigen``)."""
    names: dict[str, int] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            name = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
        except OSError:  # the thread ended meanwhile
            continue
        names[name] = names.get(name, 0) + 1
    return dict(sorted(names.items()))


def _progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def markdown_table(reports: list[dict]) -> str:
    """A README table of one or more reports: per case and thread budget, both medians (p10–p90),
    the speedup (with its range over rounds) and the first-call times. When several reports hold
    the same case and thread budget, the last one given wins (e.g. a rerun at a quieter time)."""
    lines = [
        "| input | batch | op | threads | dkd-jax ms (p10–p90) | PyTorch ms (p10–p90) "
        "| speedup (rounds) | first call s, jax / torch | timed steps | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = {}  # a case measured again in a later report replaces the earlier row
    for report in reports:
        for run in report["runs"]:
            for c in run["cases"]:
                threads = run["threads"]["threads"]
                split = run["threads"].get("jax_step_devices", 1)
                rows[(tuple(c["input"]), c["batch"], OPS.index(c["op"]), threads, split)] = c
    for (inp, batch, _, threads, split), c in sorted(rows.items()):
        o, t = c["ours"], c["theirs"]
        speedup, rounds = _speedups(c)
        lines.append(
            f"| {inp[0]}×{inp[1]} | {batch} | {c['op']} "
            f"| {threads}{f' ({split} JAX devices)' if split > 1 else ''} "
            f"| {o['median_ms']:.0f} ({o['p10_ms']:.0f}–{o['p90_ms']:.0f}) "
            f"| {t['median_ms']:.0f} ({t['p10_ms']:.0f}–{t['p90_ms']:.0f}) "
            f"| **{speedup:.2f}** ({min(rounds):.2f}–{max(rounds):.2f}) "
            f"| {o['first_call_s']:.1f} / {t['first_call_s']:.1f} | {o['timed_steps']} "
            f"| {c['load_before'][0]:.1f}→{c['load_after'][0]:.1f} |"
        )
    return "\n".join(lines)


def _speedups(case: dict) -> tuple[float, list[float]]:
    """The case's speedup and its per-round values, from the medians themselves: the stored
    ``speedup`` is rounded to 3 decimals, and printing that with 2 rounds twice (1.2447 is stored
    as 1.245 and would print as 1.25). Reports without per-round medians give their stored
    per-round values."""
    ours, theirs = case["ours"], case["theirs"]
    speedup = theirs["median_ms"] / ours["median_ms"]
    if "round_medians_ms" in ours and "round_medians_ms" in theirs:
        pairs = zip(ours["round_medians_ms"], theirs["round_medians_ms"], strict=True)
        return speedup, [t / o for o, t in pairs]
    return speedup, case["speedup_per_round"]


def _csv(kind, allowed=None):
    def parse(text: str):
        values = [kind(v) for v in text.split(",") if v]
        bad = [v for v in values if allowed is not None and v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {allowed}")
        return values

    return parse


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--threads", type=_csv(int), help="thread budgets (default: 1 and all cores)")
    p.add_argument("--shapes", type=_csv(str, SHAPES), default=list(SHAPES))
    p.add_argument("--batches", type=_csv(int), help="default 32,256 (gpu: 32,256,1024)")
    p.add_argument(
        "--ops",
        type=_csv(str, OPS),
        default=list(DEFAULT_OPS),
        help=f"of {','.join(OPS)} (default {','.join(DEFAULT_OPS)})",
    )
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3)")
    p.add_argument("--steps", type=int, help="timed steps per side per round (default 10)")
    p.add_argument("--warmup", type=int, help="untimed steps after the first call (default 2)")
    p.add_argument("--quick", action="store_true", help="mfcc26, batch 32, 3 rounds x 3 steps")
    p.add_argument("--xla-flags", default="", help="extra XLA_FLAGS for ours (e.g. to try a flag)")
    p.add_argument(
        "--split-cpu",
        action="store_true",
        help="CPU: dkd-jax on one JAX device per thread, the batch split over them "
        "(train.py --cpu-devices N)",
    )
    p.add_argument(
        "--conv-algorithm",
        choices=("xla", "taps_forward", "taps"),
        default="xla",
        help="conv_algorithm of dkd-jax's trained model (the student; the teacher in "
        "teacher_ce) (README: Speed against PyTorch)",
    )
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument(
        "--cases-log",
        metavar="JSONL",
        help="also append every finished case here as one JSON line (kept if the run is cut short)",
    )
    p.add_argument(
        "--table",
        nargs="+",
        metavar="JSON",
        help="print the README table of saved reports, run nothing",
    )
    p.add_argument("--threads-child", type=int, help=argparse.SUPPRESS)
    return p


def _resolve(args) -> None:
    quick = args.quick
    args.rounds = args.rounds if args.rounds is not None else 3
    args.steps = args.steps if args.steps is not None else (3 if quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    if args.batches is None:
        args.batches = [32] if quick else ([32, 256, 1024] if args.device == "gpu" else [32, 256])
    if quick and args.shapes == list(SHAPES):
        args.shapes = ["mfcc26"]
    if args.threads is None:
        args.threads = [os.cpu_count() or 1] if args.device == "gpu" else _default_threads()
    if min(args.rounds, args.steps) < 1 or args.warmup < 0 or min(args.threads) < 1:
        _fail("--rounds and --steps must be ≥ 1, --warmup ≥ 0, --threads ≥ 1")
    if min(args.batches) < 1:
        _fail("--batches must be ≥ 1")
    if args.split_cpu and args.device != "cpu":
        _fail("--split-cpu splits the CPU; with --device gpu dkd-jax runs on one GPU")
    uneven = [(b, t) for b in args.batches for t in args.threads if args.split_cpu and b % t]
    if uneven:
        b, t = uneven[0]
        _fail(f"--split-cpu: batch {b} does not split evenly over {t} devices (--threads {t})")


def _default_threads() -> list[int]:
    cores = len(os.sched_getaffinity(0))
    return sorted({1, cores})


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import benchjson  # bench/ is on sys.path (above); tests import this module by path

    if problem := benchjson.out_problem(args.out):
        print(f"compare_torch.py: error: {problem}", file=sys.stderr)
        return 2
    if args.table:
        reports = []
        for path in args.table:
            try:
                report = json.loads(Path(path).read_text())
                # A results file may bundle several invocations (in the order they ran).
                reports += report["invocations"] if "invocations" in report else [report]
            except OSError as error:
                _fail(f"{path}: {error.strerror}")
            except ValueError as error:
                _fail(f"{path}: not a JSON report ({error})")
        try:
            print(markdown_table(reports))
        except (KeyError, TypeError, IndexError) as error:
            _fail(f"{' '.join(args.table)}: not a compare_torch report (missing {error})")
        return 0
    _resolve(args)  # bad arguments first, also without PyTorch
    if importlib.util.find_spec("torch") is None:
        _fail("PyTorch is not installed; pip install -e '.[bench]' (README: Speed against PyTorch)")
    if args.threads_child is not None:
        print(json.dumps(child(args)))
        return 0
    report: dict[str, Any] = {
        "benchmark": "bench/compare_torch.py",
        "command": " ".join(
            ["bench/compare_torch.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "device": args.device,
        "settings": {
            k: getattr(args, k)
            for k in (
                "shapes",
                "batches",
                "ops",
                "rounds",
                "steps",
                "warmup",
                "split_cpu",
                "conv_algorithm",
            )
        },
        "speedup": "theirs_median / ours_median (> 1: dkd-jax faster)",
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "runs": [],
    }
    for threads in args.threads:
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            *(sys.argv[1:] if argv is None else argv),
        ]
        cmd += ["--threads-child", str(threads)]
        _progress(f"thread budget {threads}: starting a child process")
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
        if proc.returncode != 0:
            _fail(f"the child for --threads {threads} failed (exit {proc.returncode}); see above")
        report["runs"].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(markdown_table([report]), file=sys.stderr)
    return benchjson.emit(
        report, args.out, command=benchjson.command_line("compare_torch.py", argv)
    )


if __name__ == "__main__":
    sys.exit(main())
