"""The student's training step (or inference) under each ``conv_algorithm``, interleaved.

``xla`` (XLA's convolutions), ``taps_forward`` (the one-channel first convolutions' forward
tap by tap) and ``taps`` (also the 3×3 kernel gradients tap by tap), see
``dkd_jax/conv_taps.py``: the student's cross-entropy forward + backward (BatchNorm in train
mode, synchronised over devices) from the same weights on the same batch, round-robin (xla,
taps_forward, taps, xla, …) so that machine load hits all three alike. One device or,
with ``--cpu-devices N``, the batch split over N JAX CPU devices (``pmap`` either way, as
``train.py --cpu-devices N`` trains). ``--op inference`` times the eval-mode forward instead
(where the taps settings also max-pool by strided slices). Prints JSON (medians, p10/p90, speed
relative to ``xla``, load average); writes it only with ``--out``.

  python bench/conv_algorithms.py --threads 1 --batch 32
  python bench/conv_algorithms.py --cpu-devices 2 --batch 256 --shape 26x63
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import benchjson

ROOT = Path(__file__).resolve().parents[1]


def _configure(threads: int, cpu_devices: int) -> None:
    """Thread budget and device split; must run before JAX is imported."""
    cores = sorted(os.sched_getaffinity(0))
    if threads < len(cores):
        os.sched_setaffinity(0, cores[:threads])
    flags = []
    if threads == 1:
        flags.append("--xla_cpu_multi_thread_eigen=false")
    if cpu_devices > 1:
        flags.append(f"--xla_force_host_platform_device_count={cpu_devices}")
    os.environ.update(JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags))


def _steps(shape, batch: int, devices: int, op: str) -> dict:
    """{algorithm: thunk running one forward + backward}, all from the same variables."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from dkd_jax import conv_taps, models

    rng = np.random.default_rng(0)
    x = rng.normal(size=(devices, batch // devices, *shape, 1)).astype(np.float32)
    y = (np.arange(batch) % 4).astype(np.int32).reshape(devices, -1)
    variables = models.build_model("student").init(
        jax.random.key(0), jnp.zeros((1, *shape, 1)), train=False
    )
    thunks = {}
    for algorithm in conv_taps.ALGORITHMS:
        model = models.build_model(
            "student", conv_algorithm=algorithm, batch_norm_axis_name="batch"
        )

        def grads(params, stats, x, y, model=model):
            def loss(p):
                logits, updated = model.apply(
                    {"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
                )
                return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updated

            return jax.grad(loss, has_aux=True)(params)

        def logits(params, stats, x, y, model=model):
            del y
            return model.apply({"params": params, "batch_stats": stats}, x, train=False)

        fn = jax.pmap(grads if op == "train" else logits, axis_name="batch")
        rep = jax.tree.map(lambda a: np.stack([np.asarray(a)] * devices), variables)
        args = (rep["params"], rep["batch_stats"], x, y)
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        thunks[algorithm] = (
            lambda fn=fn, args=args: jax.block_until_ready(fn(*args)),
            time.perf_counter() - t0,
        )
    return thunks


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--cpu-devices", type=int, default=1, help="split the CPU into N JAX devices")
    p.add_argument("--shape", type=benchjson.shape_arg, default=(26, 63), help="freq x time")
    p.add_argument("--batch", type=int, default=32, help="global batch (split over devices)")
    p.add_argument("--rounds", type=int, default=15, help="timed steps per algorithm")
    p.add_argument("--op", choices=("train", "inference"), default="train")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    benchjson.check_out(p, args.out)
    if args.threads < 1 or args.cpu_devices < 1:
        p.error("--threads and --cpu-devices must be ≥ 1")
    if args.rounds < 2:  # the p10/p90 quantiles need two
        p.error("--rounds must be ≥ 2")
    if args.batch % args.cpu_devices:
        p.error(f"--batch {args.batch} does not split over {args.cpu_devices} devices")
    _configure(args.threads, args.cpu_devices)
    sys.path[:0] = [str(ROOT)]
    from dkd_jax import host_memory

    memory = host_memory.configure()
    report = {
        "benchmark": "bench/conv_algorithms.py",
        "command": " ".join(
            ["bench/conv_algorithms.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "threads": args.threads,
        "cpu_devices": args.cpu_devices,
        "shape": list(args.shape),
        "batch": args.batch,
        "rounds": args.rounds,
        "op": args.op,
        "host_memory": memory,
        "load_before": list(os.getloadavg()),
    }
    thunks = _steps(args.shape, args.batch, args.cpu_devices, args.op)
    for fn, _ in thunks.values():  # one untimed call after the compiling one, as elsewhere
        fn()
    times = {a: [] for a in thunks}
    for _ in range(args.rounds):
        for algorithm, (fn, _) in thunks.items():
            t0 = time.perf_counter()
            fn()
            times[algorithm].append(time.perf_counter() - t0)
    base = statistics.median(times["xla"])
    report["step_ms"] = {}
    for algorithm, ts in times.items():
        q = statistics.quantiles(ts, n=10, method="inclusive")  # within the data
        report["step_ms"][algorithm] = {
            "median": round(1e3 * statistics.median(ts), 2),
            "p10": round(1e3 * q[0], 2),
            "p90": round(1e3 * q[-1], 2),
            "first_call_s": round(thunks[algorithm][1], 2),
            "speed_vs_xla": round(base / statistics.median(ts), 3),
        }
    report["load_after"] = list(os.getloadavg())
    return benchjson.emit(
        report, args.out, command=benchjson.command_line("conv_algorithms.py", argv)
    )


if __name__ == "__main__":
    sys.exit(main())
