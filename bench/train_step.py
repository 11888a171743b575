"""Benchmark of the training step: segments/s, compile time, on-device vs streaming epochs.

Prints one JSON object (and writes it to ``--out`` only when given):

* ``step``: the compiled student train step at each batch size, in three variants: ``ce`` (plain
  cross-entropy, no teacher: a teacher's or a CE student's step), ``live`` (DKD with the frozen
  teacher's forward inside the step, as with augmentation) and ``precomputed`` (DKD with teacher
  logits computed once, the default without augmentation). Every step is timed on its own (blocked
  until its results are ready): median, p10 and p90 ms/step, segments/s from the median, and the
  compile time (first call minus the median step);
* ``epoch`` (only with ``--epochs``): one epoch of the precomputed-logit student over
  ``--epoch-segments`` segments at batch 32, on the on-device path (one compiled ``lax.scan``) and
  the streaming path (host batches), first epoch (with compilation) and second epoch (steady).

Inputs are random segments of the chosen feature preset (default: the project default,
log-mel 40 x 200); the models are the real teacher (8 x 256) and student (4 x 64) presets.
The side-by-side comparison with PyTorch is ``bench/compare_torch.py``.

  python bench/train_step.py --epochs   # GPU numbers (batch 32 and 256, 20 timed steps)
  python bench/train_step.py --quick    # batch 32, 5 timed steps: about a minute on 2 CPU cores
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchjson
import jax
import numpy as np

from dkd_jax import (
    audio,
    distributed,
    host_memory,
    input_pipeline,
    models,
    objective,
    train_state,
    train_step,
)
from dkd_jax import config as config_lib


def _block(tree):
    jax.block_until_ready(tree)
    return tree


#: Step variants: (StepSpec.teacher, loss).
MODES = {"ce": ("none", "ce"), "live": ("live", "dkd"), "precomputed": ("precomputed", "dkd")}


def _setup(mode: str, shape, devices, spe: int):
    teacher_mode, loss = MODES[mode]
    cfg = config_lib.get_config("default")
    student = models.create_model(
        cfg.model.student, num_classes=4, batch_norm_axis_name=distributed.AXIS
    )
    teacher = models.create_model(cfg.model.teacher, num_classes=4)
    spec = train_step.StepSpec(
        teacher=teacher_mode,
        augment=dataclasses.astuple(cfg.augment),
        num_classes=4,
    )
    fns = train_step.make_train_functions(
        student,
        teacher if teacher_mode == "live" else None,
        cfg.optim,
        spec,
        devices,
    )
    state = train_state.create_train_state(jax.random.PRNGKey(0), student, fns.tx, shape)
    t_vars = None
    if teacher_mode == "live":  # the teacher's variables, initialised like a trained run's
        t_vars = train_state.init_variables(jax.random.PRNGKey(1), teacher, shape)
    weights = train_step.hyper(
        objective.loss_weights(loss, cfg.kd), steps_per_epoch=spe, total_steps=spe * 50
    )
    return cfg, teacher, t_vars, fns, state, weights


def bench_step(batch: int, mode: str, shape, devices, steps: int) -> dict:
    d = len(devices)
    if batch % d:
        raise SystemExit(f"train_step: error: batch {batch} is not divisible by {d} devices")
    teacher_mode = MODES[mode][0]
    _, _, t_vars, fns, state, weights = _setup(mode, shape, devices, spe=1000)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, *shape)).astype(np.float32)
    y = (np.arange(batch) % 4).astype(np.int32)
    b = {"features": x, "labels": y, "mask": np.ones(batch, bool)}
    if teacher_mode == "precomputed":
        b["teacher_logits"] = rng.normal(size=(batch, 4)).astype(np.float32)
    b = {k: v.reshape(d, batch // d, *v.shape[1:]) for k, v in b.items()}
    b = jax.device_put(b, distributed.device_axis_sharding(devices))
    r_state = distributed.replicate(state, devices)
    r_teacher = distributed.replicate(t_vars, devices) if teacher_mode == "live" else None
    key = jax.random.PRNGKey(0)
    times = []
    for _ in range(steps + 2):  # the first call compiles, the second warms up
        t0 = time.perf_counter()
        r_state, m = fns.p_step(r_state, b, r_teacher, weights, key)
        _block((r_state, m))
        times.append(time.perf_counter() - t0)
    first, timed = times[0], np.asarray(times[2:])
    median = float(np.median(timed))
    return {
        "batch": batch,
        "mode": mode,
        "teacher": teacher_mode,
        "segments_per_s": batch / median,
        "ms_per_step_median": 1e3 * median,
        "ms_per_step_p10": 1e3 * float(np.percentile(timed, 10)),
        "ms_per_step_p90": 1e3 * float(np.percentile(timed, 90)),
        "compile_s": max(first - median, 0.0),
        "timed_steps": steps,
    }


def bench_epochs(num_segments: int, shape, devices, batch: int = 32) -> dict:
    local_batch = batch
    spe = input_pipeline.steps_per_epoch(num_segments, local_batch)
    _, _, _, fns, state, weights = _setup("precomputed", shape, devices, spe=spe)
    rng = np.random.default_rng(0)
    data = input_pipeline.TrainArrays(
        rng.normal(size=(num_segments, *shape)).astype(np.float32),
        (np.arange(num_segments) % 4).astype(np.int32),
        rng.normal(size=(num_segments, 4)).astype(np.float32),
    )
    d = len(devices)
    per_device = local_batch // d
    data_key, step_key = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    out = {"segments": num_segments, "batch": batch, "steps_per_epoch": spe}

    # On-device: the split replicated on the device(s), one compiled scan per epoch.
    r_state = distributed.replicate(state, devices)
    r_data = distributed.replicate(
        {"features": data.features, "labels": data.labels, "teacher_logits": data.teacher_logits},
        devices,
    )
    epoch_fn = fns.p_epoch(spe, local_batch, per_device, 0)
    times = []
    for epoch in range(2):
        t0 = time.perf_counter()
        r_state, m = epoch_fn(
            r_state,
            r_data,
            np.arange(d, dtype=np.int32),
            None,
            weights,
            (data_key, step_key),
            np.int32(epoch),
            np.int32(0),
        )
        _block(m)
        times.append(time.perf_counter() - t0)
    out["on_device_first_epoch_s"], out["on_device_epoch_s"] = times

    # Streaming: host batches gathered in a background thread, one compiled step per batch.
    r_state = distributed.replicate(state, devices)
    sharding = distributed.device_axis_sharding(devices)
    times = []
    for epoch in range(2):
        t0 = time.perf_counter()
        order = input_pipeline.host_epoch_order(data_key, epoch, num_segments, spe, local_batch)
        batches = input_pipeline.iterate_batches(
            data, order, num_devices=d, put=lambda b: jax.device_put(b, sharding)
        )
        for i, b in enumerate(batches):
            r_state, m = fns.p_step(r_state, b, None, weights, step_key)
            if d > 1 and devices[0].platform == "cpu" and i % 8 == 7:
                _block(m)
        _block(r_state)
        times.append(time.perf_counter() - t0)
    out["streaming_first_epoch_s"], out["streaming_epoch_s"] = times
    out["streaming_over_on_device"] = out["streaming_epoch_s"] / out["on_device_epoch_s"]
    return out


def main(argv=None) -> int:
    host_memory.configure()  # before JAX runs anything, as the command lines do
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="batch 32 and 5 timed steps (CPU)")
    p.add_argument("--features", default="logmel40", choices=sorted(audio.FEATURE_PRESETS))
    p.add_argument("--batches", help="comma-separated global batch sizes (default 32,256)")
    p.add_argument("--modes", default=",".join(MODES), help=f"step variants from {list(MODES)}")
    p.add_argument("--steps", type=int, help="timed steps per measurement (default 20, quick 5)")
    p.add_argument("--epochs", action="store_true", help="also compare on-device/streamed epochs")
    p.add_argument("--epoch-segments", type=int, help="segments in the epoch comparison")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    benchjson.check_out(p, args.out)
    shape = audio.FEATURE_PRESETS[args.features].segment_shape
    steps = args.steps if args.steps is not None else (5 if args.quick else 20)
    batches = args.batches or ("32" if args.quick else "32,256")
    modes = [m for m in args.modes.split(",") if m]
    if steps < 1 or not modes or set(modes) - set(MODES):
        p.error(f"--steps must be >= 1 and --modes a subset of {list(MODES)}")
    num_segments = args.epoch_segments or (256 if args.quick else 3200)
    devices = tuple(jax.local_devices())
    result = {
        "device": devices[0].device_kind,
        "platform": devices[0].platform,
        "num_devices": len(devices),
        "host_memory": host_memory.configure(),
        "jax": jax.__version__,
        "features": args.features,
        "segment_shape": list(shape),
        "teacher": "teacher preset (8 heads x 256)",
        "student": "student preset (4 heads x 64)",
        "quick": args.quick,
        "timing": "each step blocked on its own; median, p10, p90 over the timed steps",
        "step": [],
    }
    for batch in (int(b) for b in batches.split(",")):
        for mode in modes:
            result["step"].append(bench_step(batch, mode, shape, devices, steps))
            print(json.dumps(result["step"][-1]), file=sys.stderr)
    if args.epochs:
        result["epoch"] = bench_epochs(num_segments, shape, devices)
    return benchjson.emit(result, args.out, command=benchjson.command_line("train_step.py", argv))


if __name__ == "__main__":
    sys.exit(main())
