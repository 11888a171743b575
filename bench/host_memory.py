"""What ``dkd_jax.host_memory`` buys: steps with glibc's default allocator and with it.

Each measurement is a child process (the allocator is set when a process starts, before JAX
runs), alternating default / configured for ``--rounds`` rounds. A child compiles a step of a
preset, timing the compile (no persistent cache), and times ``--steps`` steps after one warm-up
step, reporting wall, user and system CPU seconds, minor page faults, peak resident memory and
the last loss (bit-identical between the two, by design). ``--op train`` (default): a CE
training step (forward + backward + Adam, BatchNorm in train mode). ``--op inference``: an
eval-mode forward from a host array to host logits, as ``eval.py predict`` runs it (the "loss"
is then the logits' sum).

  python bench/host_memory.py                     # teacher and student, batch 32, 26x63 MFCC
  python bench/host_memory.py --models student --op inference --steps 100
  python bench/host_memory.py --models teacher --batch 256 --out bench/results/x.json
  python bench/host_memory.py --models student --batch 256 --shape 40x200 --steps 3 \
      --settings trim1g,configured   # the trim threshold: 1 GiB (before) against off (now)

"configured" is ``host_memory.configure()`` as the command lines apply it, watchdog included:
a child past a third of the machine's memory relaxes the setting (its ``host_memory`` entry then
holds ``relaxed``), so big cases measure what a run of that size gets.

Prints JSON (medians per model and setting, the ratios, the load average); writes it only with
``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import benchjson  # bench/ (this script's folder) is on sys.path

ROOT = Path(__file__).resolve().parents[1]
#: ``--settings`` choices: glibc's defaults, ``host_memory.configure()``, and that with the
#: 1 GiB trim threshold it had before trimming was turned off (to measure that change).
SETTINGS = ("default", "configured", "trim1g")
_TRIM_1G = 1 << 30


def child(model_name: str, batch: int, shape: tuple[int, int], steps: int, op: str) -> dict:
    """Times ``steps`` CE training steps (``op="train"``) or eval-mode forward passes from host
    arrays to host logits (``op="inference"``, as ``eval.py predict`` runs them) in this
    process."""
    sys.path.insert(0, str(ROOT))
    from dkd_jax import host_memory

    state = host_memory.configure()  # DKD_JAX_MALLOC=default makes this a no-op
    if os.environ.get("BENCH_TRIM_THRESHOLD"):  # the "trim1g" setting
        import ctypes

        value = int(os.environ["BENCH_TRIM_THRESHOLD"])
        if ctypes.CDLL(None).mallopt(-1, value) != 1:  # M_TRIM_THRESHOLD
            sys.exit("bench/host_memory.py: mallopt(M_TRIM_THRESHOLD) refused")
        state["settings"]["M_TRIM_THRESHOLD"] = value  # the watchdog adds "relaxed" to it
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from dkd_jax import losses, models

    model = models.build_model(model_name)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, *shape, 1)).astype(np.float32))
    y = jnp.arange(batch) % 4
    variables = jax.jit(lambda k: model.init(k, x, train=False))(jax.random.key(0))
    params, stats = variables["params"], variables["batch_stats"]
    tx = optax.adam(1e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, stats, opt, x, y):
        def loss_fn(p):
            logits, updated = model.apply(
                {"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
            )
            return losses.cross_entropy(logits, y).mean(), updated["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), stats, opt, loss

    if op == "inference":
        x_host = np.asarray(x)
        t0 = time.perf_counter()
        forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
        forward = forward.lower(variables, x).compile()
        compile_s = time.perf_counter() - t0
        np.asarray(forward(variables, x_host))
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for _ in range(steps):
            logits = np.asarray(forward(variables, x_host))
        loss = float(logits.astype(np.float64).sum())
    else:
        t0 = time.perf_counter()
        step = step.lower(params, stats, opt, x, y).compile()
        compile_s = time.perf_counter() - t0
        params, stats, opt, loss = jax.block_until_ready(step(params, stats, opt, x, y))
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for _ in range(steps):
            params, stats, opt, loss = step(params, stats, opt, x, y)
        loss = float(jax.block_until_ready(loss))
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "host_memory": dict(state),  # as it ended: with "relaxed" if the watchdog acted
        "compile_s": compile_s,
        "step_ms": 1e3 * wall / steps,
        "user_s": r1.ru_utime - r0.ru_utime,
        "sys_s": r1.ru_stime - r0.ru_stime,
        "minor_faults_per_step": (r1.ru_minflt - r0.ru_minflt) / steps,
        "max_rss_mib": r1.ru_maxrss / 1024,  # ru_maxrss is in KiB on Linux
        "last_loss": loss.hex(),
    }


def _run_child(setting: str, model: str, args) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # every child compiles
    env.pop("BENCH_TRIM_THRESHOLD", None)
    if setting == "default":
        env["DKD_JAX_MALLOC"] = "default"
    else:
        env.pop("DKD_JAX_MALLOC", None)
    if setting == "trim1g":
        env["BENCH_TRIM_THRESHOLD"] = str(_TRIM_1G)
    cmd = [sys.executable, __file__, "--child", model, "--batch", str(args.batch)]
    cmd += ["--shape", "x".join(map(str, args.shape)), "--steps", str(args.steps), "--op", args.op]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"bench/host_memory.py: the {setting} child failed (exit {proc.returncode})")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["host_memory"]["applied"] != (setting != "default"):
        sys.exit(f"bench/host_memory.py: {setting} child: {result['host_memory']} (glibc only)")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="teacher,student", help="presets (comma-separated)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--shape", type=benchjson.shape_arg, default=(26, 63), help="freq x time")
    p.add_argument("--steps", type=int, default=30, help="timed steps per child")
    p.add_argument("--op", choices=("train", "inference"), default="train", help="what a step is")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per model")
    p.add_argument(
        "--settings",
        default="default,configured",
        help=f"allocator settings to compare, the first is the baseline (of {', '.join(SETTINGS)})",
    )
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--child", dest="child_model", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    benchjson.check_out(p, args.out)
    shape = args.shape
    settings = [s for s in args.settings.split(",") if s]
    if len(settings) < 2 or len(set(settings)) != len(settings) or set(settings) - set(SETTINGS):
        p.error(f"--settings: two or more different names of {', '.join(SETTINGS)}")
    if args.child_model:
        print(json.dumps(child(args.child_model, args.batch, shape, args.steps, args.op)))
        return 0
    report = {
        "benchmark": "bench/host_memory.py",
        "command": " ".join(["bench/host_memory.py", *(sys.argv[1:] if argv is None else argv)]),
        "op": args.op,
        "batch": args.batch,
        "shape": list(shape),
        "steps": args.steps,
        "rounds": args.rounds,
        "settings": settings,
        "cpu_count": os.cpu_count(),
        "load_before": list(os.getloadavg()),
        "models": {},
    }
    for name in [m for m in args.models.split(",") if m]:
        runs: dict[str, list[dict]] = {s: [] for s in settings}
        for r in range(args.rounds):
            for setting in settings:  # interleaved: default, configured, default, ...
                runs[setting].append(_run_child(setting, name, args))
                print(f"{name} round {r + 1} {setting}: {runs[setting][-1]}", file=sys.stderr)
        medians = {
            s: {
                k: round(statistics.median(run[k] for run in runs[s]), 3)
                for k in (
                    "compile_s",
                    "step_ms",
                    "user_s",
                    "sys_s",
                    "minor_faults_per_step",
                    "max_rss_mib",
                )
            }
            for s in settings
        }
        losses = {run["last_loss"] for s in settings for run in runs[s]}
        base, other = settings[0], settings[1]
        report["models"][name] = {
            "median": medians,
            # the first setting's median over the second's (> 1: the second is faster)
            "speedup_step": round(medians[base]["step_ms"] / medians[other]["step_ms"], 3),
            "speedup_compile": round(medians[base]["compile_s"] / medians[other]["compile_s"], 3),
            "identical_last_loss": len(losses) == 1,
            "runs": runs,
        }
    report["load_after"] = list(os.getloadavg())
    return benchjson.emit(report, args.out, command=benchjson.command_line("host_memory.py", argv))


if __name__ == "__main__":
    sys.exit(main())
