"""Benchmark of the training step: segments/s, compile time, on-device vs streaming epochs.

Prints one JSON object:

* ``step``: the student-DKD train step at each batch size, with the teacher *live* (teacher
  forward + student forward/backward/update, as with augmentation) and with *precomputed*
  teacher logits (the default without augmentation): segments/s (steady state), ms/step and
  compile time (first call minus a steady step);
* ``epoch``: one epoch of the precomputed-logit student over ``--epoch-segments`` segments at
  batch 32, on the on-device path (one compiled ``lax.scan``) and the streaming path (host
  batches), first epoch (with compilation) and second epoch (steady).

Inputs are random segments of the chosen feature preset (default: the project default,
log-mel 40 x 200); the models are the real teacher (8 x 256) and student (4 x 64) presets.

  python bench/train_step.py            # GPU numbers (batch 32 and 256, 20 timed steps)
  python bench/train_step.py --quick    # a few minutes on a 2-core CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import numpy as np

from dkd_jax import audio, input_pipeline, train_lib
from dkd_jax import config as config_lib


def _block(tree):
    jax.block_until_ready(tree)
    return tree


def _setup(teacher_mode: str, shape, devices, spe: int):
    cfg = config_lib.get_config("default")
    student = train_lib.create_model(
        cfg.model.student, num_classes=4, batch_norm_axis_name=train_lib.AXIS
    )
    teacher = train_lib.create_model(cfg.model.teacher, num_classes=4)
    spec = train_lib.StepSpec(
        steps_per_epoch=spe,
        teacher=teacher_mode,
        augment=dataclasses.astuple(cfg.augment),
        num_classes=4,
    )
    fns = train_lib.make_train_functions(
        student,
        teacher if teacher_mode == "live" else None,
        cfg.optim,
        spec,
        devices,
        total_steps=spe * 50,
        segment_shape=shape,
    )
    state = train_lib.create_train_state(jax.random.PRNGKey(0), student, fns.tx, shape)
    t_vars = jax.device_get(
        teacher.init(jax.random.PRNGKey(1), np.zeros((1, *shape, 1), np.float32), train=False)
    )
    weights = train_lib.loss_weights("dkd", cfg.kd)
    return cfg, teacher, t_vars, fns, state, weights


def bench_step(batch: int, teacher_mode: str, shape, devices, steps: int) -> dict:
    d = len(devices)
    if batch % d:
        raise SystemExit(f"batch {batch} is not divisible by {d} devices")
    _, _, t_vars, fns, state, weights = _setup(teacher_mode, shape, devices, spe=1000)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, *shape)).astype(np.float32)
    y = (np.arange(batch) % 4).astype(np.int32)
    b = {"features": x, "labels": y, "mask": np.ones(batch, bool)}
    if teacher_mode == "precomputed":
        b["teacher_logits"] = rng.normal(size=(batch, 4)).astype(np.float32)
    b = {k: v.reshape(d, batch // d, *v.shape[1:]) for k, v in b.items()}
    b = jax.device_put(
        b, jax.NamedSharding(jax.sharding.Mesh(np.array(devices), ("b",)), jax.P("b"))
    )
    r_state = train_lib.replicate(state, devices)
    r_teacher = train_lib.replicate(t_vars, devices) if teacher_mode == "live" else None
    key = jax.random.PRNGKey(0)
    t0 = time.perf_counter()
    r_state, m = fns.p_step(r_state, b, r_teacher, weights, key)
    _block(m)
    first = time.perf_counter() - t0
    r_state, m = fns.p_step(r_state, b, r_teacher, weights, key)  # one more warm-up
    _block(m)
    t0 = time.perf_counter()
    for i in range(steps):
        r_state, m = fns.p_step(r_state, b, r_teacher, weights, key)
        if d > 1 and devices[0].platform == "cpu" and i % 8 == 7:
            _block(m)  # CPU collectives need a sync every few steps
    _block(r_state)
    per_step = (time.perf_counter() - t0) / steps
    return {
        "batch": batch,
        "teacher": teacher_mode,
        "segments_per_s": batch / per_step,
        "ms_per_step": 1e3 * per_step,
        "compile_s": max(first - per_step, 0.0),
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
    r_state = train_lib.replicate(state, devices)
    r_data = train_lib.replicate(
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
    r_state = train_lib.replicate(state, devices)
    sharding = jax.NamedSharding(jax.sharding.Mesh(np.array(devices), ("b",)), jax.P("b"))
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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few steps, small epoch (CPU)")
    p.add_argument("--features", default="logmel40", choices=sorted(audio.FEATURE_PRESETS))
    p.add_argument("--batches", default="32,256", help="comma-separated global batch sizes")
    p.add_argument("--steps", type=int, help="timed steps per measurement")
    p.add_argument("--epoch-segments", type=int, help="segments in the epoch comparison")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    shape = audio.FEATURE_PRESETS[args.features].segment_shape
    steps = args.steps or (3 if args.quick else 20)
    num_segments = args.epoch_segments or (256 if args.quick else 3200)
    devices = tuple(jax.local_devices())
    result = {
        "device": devices[0].device_kind,
        "platform": devices[0].platform,
        "num_devices": len(devices),
        "features": args.features,
        "segment_shape": list(shape),
        "teacher": "teacher preset (8 heads x 256)",
        "student": "student preset (4 heads x 64)",
        "quick": args.quick,
        "step": [],
    }
    for batch in (int(b) for b in args.batches.split(",")):
        for mode in ("live", "precomputed"):
            result["step"].append(bench_step(batch, mode, shape, devices, steps))
            print(json.dumps(result["step"][-1]), file=sys.stderr)
    result["epoch"] = bench_epochs(num_segments, shape, devices)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
