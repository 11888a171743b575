"""XLA:CPU flags and execution levers for the training step, measured side by side.

A candidate is a set of XLA flags, optionally with environment variables for its process (or a
plain ``jit`` instead of ``pmap``). Each runs in its own subprocess (XLA_FLAGS must be set
before JAX starts), rounds interleaved (candidate A, B, C, A, B, C, ...), so a busy shared
machine moves all of them alike.
Per candidate and case: compile time (seconds the process spent compiling the step,
from ``jax.monitoring``), the median / p10 / p90 of the step time after warm-up, and whether
the state after the first step is bit for bit the default's (``same_bits_as_default``).

    python bench/cpu_flags.py [--quick] [--threads 1] [--rounds 3] [--steps 30] [--out FILE]

Cases: the CE student step, the DKD student step (precomputed teacher logits) and the CE
teacher step (8 heads x 256), MFCC 26x63, batch 32 (``--shape``/``--batch`` to change).
Prints JSON; writes it only with ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time

import benchjson

CANDIDATES = {
    "default": {"flags": ""},
    "jit (no pmap)": {"flags": "", "jit": True},
    "xnnpack": {"flags": "--xla_cpu_use_xnnpack=true"},
    "onednn": {"flags": "--xla_cpu_use_onednn=true"},
    "no thunk runtime": {"flags": "--xla_cpu_use_thunk_runtime=false"},
    # LLVM level 1 compiles 8-15 % faster at the same speed, with the default's bits at 26x63
    # batch 32 but not at 12x16 batch 16 (0.89x there); level 0 is 1.7-1.9x slower, other bits.
    "opt level 1": {"flags": "--xla_backend_optimization_level=1"},
    "opt level 0": {"flags": "--xla_backend_optimization_level=0"},
    # JAX's own optimisation-level setting (an environment variable, no XLA flag): no effect
    # on XLA:CPU in this jaxlib.
    "jax O1": {"flags": "", "env": {"JAX_OPTIMIZATION_LEVEL": "O1"}},
    "no expensive llvm passes": {"flags": "--xla_llvm_disable_expensive_passes=true"},
    # YNNPACK (XNNPACK's successor in this jaxlib) for every dot / every convolution: the
    # student's kernel gradients run 2.2x faster, its input gradients and forward passes slower
    # (bench/step_breakdown.py --xla-flags); these measure the whole steps.
    "ynn dot": {"flags": "--xla_cpu_experimental_ynn_fusion_type=individual_dot"},
    "ynn convolution": {"flags": "--xla_cpu_experimental_ynn_fusion_type=individual_convolution"},
    # XLA:CPU's older loop-fusion code generator: the steps compile in 25-30 % less time but run
    # 17-23 % slower, and the DKD step rounds differently (same_bits_as_default is false).
    "no fusion emitters": {"flags": "--xla_cpu_use_fusion_emitters=false"},
}


def _child(args) -> dict:
    """One candidate, one round: build, compile and time the steps (runs in the subprocess)."""
    from dkd_jax import host_memory

    host_memory.configure()  # the host allocator training uses, before JAX runs
    import jax
    import numpy as np

    from dkd_jax import config as config_lib
    from dkd_jax import distributed, models, objective, train_state, train_step

    compile_s = {"t": 0.0}

    def listener(name, secs, **_):
        if name.startswith("/jax/core/compile/"):
            compile_s["t"] += secs

    jax.monitoring.register_event_duration_secs_listener(listener)
    f, t = args.shape
    b = args.batch
    rng = np.random.default_rng(0)
    x = rng.normal(size=(b, f, t)).astype(np.float32)
    y = (np.arange(b) % 4).astype(np.int32)
    tl = rng.normal(size=(b, 4)).astype(np.float32)
    cfg = config_lib.get_config("default")
    devices = distributed.local_devices(1)
    out = {}
    for case in args.cases:
        arch = cfg.model.teacher if case == "teacher" else cfg.model.student
        spec = train_step.StepSpec(
            teacher="precomputed" if case == "dkd" else "none",
            augment=dataclasses.astuple(config_lib.AugmentConfig()),
            num_classes=4,
        )
        model = models.create_model(arch, num_classes=4, batch_norm_axis_name=distributed.AXIS)
        fns = train_step.make_train_functions(model, None, cfg.optim, spec, devices)
        step = fns.p_step
        if args.jit:  # the same step under jit(vmap) over a size-1 device axis, no pmap
            step_fn = functools.partial(
                train_step.train_step, model=model, teacher_model=None, optim=cfg.optim, spec=spec
            )

            def one(state, batch, teacher_vars, hyper, rng, step_fn=step_fn):
                return train_step._guarded_step(
                    state, batch, teacher_vars, hyper, rng, True, step_fn=step_fn
                )

            step = jax.jit(
                jax.vmap(one, axis_name=distributed.AXIS, in_axes=(0, 0, None, None, None)),
                donate_argnums=(0,),
            )
        state = train_state.create_train_state(
            jax.random.PRNGKey(0),
            models.create_model(arch, num_classes=4),
            fns.tx,
            (f, t),
        )
        hyper = train_step.hyper(
            objective.loss_weights("ce" if case == "teacher" else case, cfg.kd),
            steps_per_epoch=100,
            total_steps=1000,
        )
        batch = {"features": x[None], "labels": y[None], "mask": np.ones((1, b), bool)}
        if case == "dkd":
            batch["teacher_logits"] = tl[None]
        r_state = (
            distributed.replicate(state, devices)
            if not args.jit
            else jax.tree.map(lambda a: np.asarray(a)[None], state)
        )
        key = jax.random.PRNGKey(1)
        c0 = compile_s["t"]
        t0 = time.perf_counter()
        r_state, m = step(r_state, batch, None, hyper, key)
        jax.block_until_ready(m)
        first = time.perf_counter() - t0
        compiled = compile_s["t"] - c0
        digest = hashlib.sha256()  # the state after one step: does the candidate round alike?
        for leaf in jax.tree.leaves(r_state):
            digest.update(np.asarray(leaf).tobytes())
        for _ in range(3):
            r_state, m = step(r_state, batch, None, hyper, key)
        jax.block_until_ready(m)
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            r_state, m = step(r_state, batch, None, hyper, key)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
        out[case] = {
            "first_call_s": first,
            "compile_s": compiled,
            "times_s": times,
            "state_digest": digest.hexdigest(),
        }
    return out


def _run_candidate(name, cand, args) -> dict:
    env = dict(os.environ)
    flags = cand["flags"]
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
        if args.threads == 1:
            flags += " --xla_cpu_multi_thread_eigen=false"  # XLA has no intra-op thread flag
    env["XLA_FLAGS"] = flags.strip()
    env.update(cand.get("env", {}))
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, __file__, "--child", "--steps", str(args.steps)]
    cmd += ["--batch", str(args.batch), "--shape", *map(str, args.shape)]
    cmd += ["--jit"] if cand.get("jit") else []
    cmd += ["--cases", *args.cases]
    if args.threads == 1:
        cmd = ["taskset", "-c", str(min(os.sched_getaffinity(0))), *cmd]  # a core we may use
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1][:300] if proc.stderr else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _summary(times):
    q = statistics.quantiles(times, n=10, method="inclusive")  # within the data
    return {
        "median_ms": 1e3 * statistics.median(times),
        "p10_ms": 1e3 * q[0],
        "p90_ms": 1e3 * q[-1],
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--jit", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="2 rounds x 10 steps")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=1, help="1 (taskset to one core) or 0 (all)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument(
        "--cases",
        nargs="+",
        default=["ce", "dkd", "teacher"],
        choices=["ce", "dkd", "teacher"],
        help="CE student step, DKD student step (precomputed teacher logits), CE teacher step",
    )
    p.add_argument("--shape", type=int, nargs=2, default=(26, 63))
    p.add_argument("--candidates", help="comma-separated subset of: " + ", ".join(CANDIDATES))
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    if not args.child and not args.quick and args.rounds * args.steps < 2:
        p.error("--rounds x --steps must be >= 2 (a median and p10/p90 need two times)")
    if args.rounds < 1 or args.steps < 1:
        p.error("--rounds and --steps must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if problem := benchjson.out_problem(args.out):
        print(f"cpu_flags.py: error: {problem}", file=sys.stderr)
        return 2
    if args.child:
        print(json.dumps(_child(args)))
        return 0
    if args.quick:
        args.rounds, args.steps = 2, 10
    names = args.candidates.split(",") if args.candidates else list(CANDIDATES)
    load = [os.getloadavg()]
    raw: dict = {n: [] for n in names}
    for _ in range(args.rounds):
        for n in names:
            raw[n].append(_run_candidate(n, CANDIDATES[n], args))
    load.append(os.getloadavg())
    report = {
        "setup": {
            "threads": args.threads,
            "batch": args.batch,
            "shape": list(args.shape),
            "rounds": args.rounds,
            "steps": args.steps,
            "loadavg_before_after": load,
        },
        "candidates": {},
    }
    base = None
    for n in names:
        runs = [r for r in raw[n] if "error" not in r]
        if not runs:
            report["candidates"][n] = {"error": raw[n][0]["error"], **CANDIDATES[n]}
            continue
        entry = {"flags": CANDIDATES[n]["flags"]}
        for case in args.cases:
            times = [t for r in runs for t in r[case]["times_s"]]
            entry[case] = {
                **_summary(times),
                "compile_s_median": statistics.median(r[case]["compile_s"] for r in runs),
                "first_call_s_median": statistics.median(r[case]["first_call_s"] for r in runs),
                "state_digests": sorted({r[case]["state_digest"] for r in runs}),
            }
        report["candidates"][n] = entry
        if n == "default":
            base = entry
    if base:
        for entry in report["candidates"].values():
            for case in args.cases:
                if case in entry:
                    entry[case]["speed_vs_default"] = (
                        base[case]["median_ms"] / entry[case]["median_ms"]
                    )
                    entry[case]["same_bits_as_default"] = (
                        entry[case]["state_digests"] == base[case]["state_digests"]
                    )
    return benchjson.emit(report, args.out, command=benchjson.command_line("cpu_flags.py", argv))


if __name__ == "__main__":
    sys.exit(main())
