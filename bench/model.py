"""Benchmark of the models: throughput, compile time and XLA FLOPs of MACNN variants.

Prints one JSON object (and writes it to ``--out`` if given). For every (model preset, feature
layout, batch size, dtype) on the first local device:

* ``forward``: the eval-mode forward pass (``train=False``), as used for prediction and for a
  frozen teacher;
* ``forward_backward``: loss and parameter gradients in training mode (batch statistics updated,
  area-attention dropout on), i.e. a train step without the optimiser update;

each with segments/s (from the median step time), the compile time (lower + compile), FLOPs per
segment from XLA's cost analysis, and XLA's memory analysis where the backend reports one.
``flops_per_segment`` is the model's arithmetic: the cost analysis of the unchunked function on the
CPU backend (on a GPU run it is compiled for the host CPU too), the same on every device;
``compiled_flops_per_segment`` is
``jitted.lower(...).compile().cost_analysis()``, which on GPU omits library calls (cuDNN
convolutions, cuBLAS matmuls) and on any backend counts a loop body (query chunks) once.

Area-attention entries also carry the analytic cost of
:func:`dkd_jax.area_attention.area_attention_cost` and the query chunk used: when one step's
attention weights would exceed ``--area-memory-gb``, queries are processed in chunks (same result,
less memory). A configuration that fails (e.g. out of memory) is recorded with its error and the
run goes on.

Feature layouts (paper_spec §1.4; DESIGN §3): mfcc26 = 26×63, logmel40/64/128 = 40/64/128×200.

  python bench/model.py --quick                       # CPU smoke: ~1-2 minutes on 2 cores
  python bench/model.py                               # full grid (for a GPU)
  python bench/model.py --models student --layouts logmel40 --batches 256 --dtypes bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from dkd_jax import area_attention, host_memory, models

LAYOUTS = {
    "mfcc26": (26, 63),
    "logmel40": (40, 200),
    "logmel64": (64, 200),
    "logmel128": (128, 200),
}
DEFAULT_MODELS = ("student", "teacher", "area_teacher")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
QUICK = {"models": DEFAULT_MODELS, "layouts": ("mfcc26", "logmel40"), "batches": (32,)}


def _random_variables(model: models.MACNN, seed: int = 0) -> dict[str, Any]:
    """Variables of the right structure filled with random numbers (init compile is not timed)."""
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 5, 5, 1)), train=False)
    )
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1])) if leaf.ndim == 4 else leaf.shape[0]
            return rng.uniform(-1, 1, leaf.shape).astype(np.float32) / np.sqrt(fan_in)
        if name in ("scale", "var"):
            return np.ones(leaf.shape, np.float32)
        return np.zeros(leaf.shape, np.float32)

    return jax.device_put(jax.tree_util.tree_map_with_path(fill, shapes))


def _cost(compiled: Any) -> dict[str, float]:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):  # older JAX: one dict per device
        analysis = analysis[0] if analysis else {}
    return dict(analysis or {})


def _memory(compiled: Any) -> dict[str, int] | None:
    try:
        stats = compiled.memory_analysis()
    except Exception:  # not implemented on every backend
        return None
    if stats is None:
        return None
    fields = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes")
    return {f: int(getattr(stats, f)) for f in fields if hasattr(stats, f)}


def _time_function(compiled: Any, args: tuple, *, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return times


def _model_flops(fn: Any, args: tuple) -> tuple[float, str]:
    """The model's arithmetic (FLOPs per step) from XLA's cost analysis, the same on any backend.

    ``fn`` is the unchunked function (a loop body, e.g. a query chunk, is counted once). The CPU
    backend counts the lowered HLO; GPU backends give no count before compiling and omit library
    calls (cuDNN convolutions, cuBLAS matmuls) after, so there the function is compiled for the
    host CPU instead (compile only; nothing runs).
    """
    cost = _cost(jax.jit(fn).lower(*args))
    if "flops" in cost and jax.default_backend() == "cpu":
        return float(cost["flops"]), "lowered_hlo"
    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError:
        return float("nan"), "unavailable (no CPU backend)"
    cpu_args = jax.device_put(args, cpu)
    cost = _cost(jax.jit(fn).lower(*cpu_args).compile())
    return float(cost.get("flops", float("nan"))), "cpu_compiled"


def _measure(
    fn: Any, args: tuple, batch: int, *, reference_fn: Any, warmup: int, iters: int
) -> dict[str, Any]:
    """Compile, time and cost one function; FLOPs are taken from ``reference_fn`` (see below)."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    flops, flops_source = _model_flops(reference_fn, args)
    compiled_cost = _cost(compiled)
    times = _time_function(compiled, args, warmup=warmup, iters=iters)
    step = statistics.median(times)
    out: dict[str, Any] = {
        "compile_s": round(compile_s, 3),
        "step_ms_median": round(1e3 * step, 3),
        "step_ms_min": round(1e3 * min(times), 3),
        "segments_per_s": round(batch / step, 1),
        "flops_per_segment": flops / batch,
        "flops_source": flops_source,
        "compiled_flops_per_segment": compiled_cost.get("flops", float("nan")) / batch,
        "compiled_bytes_accessed_per_segment": compiled_cost.get("bytes accessed", float("nan"))
        / batch,
        "iters": iters,
    }
    memory = _memory(compiled)
    if memory:
        out["memory"] = memory
    return out


def benchmark_one(
    preset: str,
    layout: str,
    batch: int,
    dtype_name: str,
    *,
    warmup: int,
    iters: int,
    area_memory_gb: float,
) -> dict[str, Any]:
    """Forward and forward+backward measurements of one configuration."""
    freq, time_frames = LAYOUTS[layout]
    height, width = models.feature_map_size(freq, time_frames)
    base = models.build_model(preset)
    entry: dict[str, Any] = {
        "model": preset,
        "attention": base.attention,
        "attention_heads": base.attention_heads,
        "attention_hidden": base.attention_hidden,
        "layout": layout,
        "input_shape": [freq, time_frames],
        "feature_map": [height, width],
        "batch": batch,
        "dtype": dtype_name,
    }
    overrides: dict[str, Any] = {"dtype": DTYPES[dtype_name]}
    if base.attention == "area":
        kwargs = {
            "max_height": base.area_max_height,
            "max_width": base.area_max_width,
            "num_heads": base.attention_heads,
        }
        chunk = area_attention.query_chunk_size_for_budget(
            height, width, batch_size=batch, budget_bytes=area_memory_gb * 2**30, **kwargs
        )
        overrides["area_query_chunk_size"] = chunk
        depth = base.attention_hidden if base.area_projection else 80 // base.attention_heads
        entry["area_query_chunk_size"] = chunk
        entry["area_cost_per_segment"] = area_attention.area_attention_cost(
            height,
            width,
            depth_per_head=depth,
            in_channels=80 if base.area_projection else None,
            query_chunk_size=chunk,
            **kwargs,
        )
    model = models.build_model(preset, **overrides)
    reference = models.build_model(preset, **{**overrides, "area_query_chunk_size": None})
    variables = _random_variables(model)
    entry["params"] = models.count_parameters(variables["params"])
    rng = np.random.default_rng(1)
    x = jax.device_put(rng.standard_normal((batch, freq, time_frames, 1)).astype(np.float32))
    labels = jax.device_put(rng.integers(0, model.num_classes, batch).astype(np.int32))

    def make_forward(net):
        def forward(variables, x):
            return net.apply(variables, x, train=False)

        return forward

    def make_forward_backward(net):
        def forward_backward(variables, x, labels, key):
            def loss_fn(params):
                logits, updates = net.apply(
                    {"params": params, "batch_stats": variables["batch_stats"]},
                    x,
                    train=True,
                    rngs={"dropout": key},
                    mutable=["batch_stats"],
                )
                loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                return loss, updates["batch_stats"]

            (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                variables["params"]
            )
            return loss, grads, batch_stats

        return forward_backward

    for name, make, args in (
        ("forward", make_forward, (variables, x)),
        ("forward_backward", make_forward_backward, (variables, x, labels, jax.random.key(0))),
    ):
        try:
            entry[name] = _measure(
                make(model),
                args,
                batch,
                reference_fn=make(reference),
                warmup=warmup,
                iters=iters,
            )
        except Exception as error:  # e.g. RESOURCE_EXHAUSTED on a big area-attention map
            entry[name] = {"error": f"{type(error).__name__}: {str(error)[:400]}"}
    return entry


def _device_info() -> dict[str, Any]:
    devices = jax.devices()
    return {
        "backend": jax.default_backend(),
        "device_count": len(devices),
        "devices": [
            {"id": d.id, "platform": d.platform, "device_kind": d.device_kind} for d in devices
        ],
        "benchmarked_device": str(devices[0]),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "python": platform.python_version(),
        "host_cpu_count": os.cpu_count(),
        "host_memory": host_memory.configure(),
    }


def _write(path: str, report: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, path)


def _csv(value: str) -> list[str]:
    return [v for v in value.split(",") if v]


def main(argv: list[str] | None = None) -> int:
    host_memory.configure()  # before JAX runs anything, as the command lines do
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"CPU smoke grid: {QUICK}")
    parser.add_argument("--models", type=_csv, help=f"presets (default {DEFAULT_MODELS})")
    parser.add_argument("--layouts", type=_csv, help=f"feature layouts from {sorted(LAYOUTS)}")
    parser.add_argument("--batches", type=_csv, help="batch sizes (default 32,256)")
    parser.add_argument("--dtypes", type=_csv, default=["float32"], help="float32,bfloat16")
    parser.add_argument("--warmup", type=int, help="untimed runs after compiling (default 2)")
    parser.add_argument("--iters", type=int, help="timed runs (default 10; --quick 2)")
    parser.add_argument(
        "--area-memory-gb",
        type=float,
        default=4.0,
        help="chunk area-attention queries when one step's weights exceed this (default 4)",
    )
    parser.add_argument(
        "--out", help="also write the JSON here (rewritten after every configuration)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    import benchjson  # bench/ is the script's directory

    benchjson.check_out(parser, args.out)

    preset_names = args.models or list(QUICK["models"] if args.quick else DEFAULT_MODELS)
    layouts = args.layouts or list(QUICK["layouts"] if args.quick else LAYOUTS)
    batches = [int(b) for b in (args.batches or (QUICK["batches"] if args.quick else (32, 256)))]
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    iters = args.iters if args.iters is not None else (2 if args.quick else 10)
    for name, values, allowed in (
        ("--models", preset_names, models.MODEL_PRESETS),
        ("--layouts", layouts, LAYOUTS),
        ("--dtypes", args.dtypes, DTYPES),
    ):
        bad = sorted(set(values) - set(allowed))
        if bad:
            parser.error(f"{name}: unknown {bad}; choose from {sorted(allowed)}")
    if min(batches) < 1 or iters < 1 or warmup < 0:
        parser.error("batches and --iters must be ≥ 1, --warmup ≥ 0")

    grid = [
        (m, layout, b, d) for m in preset_names for layout in layouts for b in batches
        for d in args.dtypes
    ]  # fmt: skip
    disable = args.no_progress or not sys.stderr.isatty()
    report: dict[str, Any] = {
        "benchmark": "bench/model.py",
        "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
        **_device_info(),
        "settings": {
            "models": preset_names,
            "layouts": {name: LAYOUTS[name] for name in layouts},
            "batches": batches,
            "dtypes": args.dtypes,
            "warmup": warmup,
            "iters": iters,
            "area_memory_gb": args.area_memory_gb,
            "timing": "median wall time of jitted steps on the first device, inputs on device",
        },
        "complete": False,
        "loadavg_before": list(os.getloadavg()),
        "wall_s": 0.0,
        "results": [],
    }
    start = time.perf_counter()
    for index, (preset, layout, batch, dtype_name) in enumerate(
        tqdm(grid, desc="bench/model", disable=disable)
    ):
        entry = benchmark_one(
            preset,
            layout,
            batch,
            dtype_name,
            warmup=warmup,
            iters=iters,
            area_memory_gb=args.area_memory_gb,
        )
        report["results"].append(entry)
        report["wall_s"] = round(time.perf_counter() - start, 1)
        report["loadavg_at_end"] = list(os.getloadavg())  # of what is done so far
        if disable:  # one line per configuration instead of a bar
            speeds = [
                entry[k].get("segments_per_s", "error") for k in ("forward", "forward_backward")
            ]
            print(
                f"[{index + 1}/{len(grid)}] {preset} {layout} b{batch} {dtype_name}: "
                f"segments/s fwd {speeds[0]}, fwd+bwd {speeds[1]} ({report['wall_s']} s)",
                file=sys.stderr,
                flush=True,
            )
        if args.out:  # keep what is done, in case a long grid is cut off
            _write(args.out, report)
    report["complete"] = True
    print(json.dumps(report, indent=1))
    if args.out:
        _write(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
