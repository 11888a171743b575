"""Where one training step's time goes, layer by layer: dkd-jax under JAX's profiler beside the
PyTorch reference under ``torch.profiler``, on the same weights and batch.

``bench/compare_torch.py`` times whole steps and ``bench/step_breakdown.py`` times pieces one by
one, outside the step; this profiles the very steps that ``compare_torch.py`` times (its
``build_ours`` / ``build_theirs``: the project's compiled ``p_step`` and plain PyTorch), so that
the pieces add up to the step and include what only happens inside it (layout copies, fusion).

* dkd-jax: ``--steps`` calls under ``jax.profiler``. Each executed HLO instruction (a thunk of
  XLA:CPU) is one trace event; its exclusive time (minus the events nested in it, as the
  instructions of a ``while`` body) is attributed through the op_name metadata of the compiled
  module (dumped with ``--xla_dump_to``) to a **layer** (``conv2``, ``bn2``, ``relu``,
  ``max_pool``, ``head_fusion``, ...: the Flax module or named scope below ``MACNN``) and a
  **direction** (``forward``; ``backward``: under ``transpose(jvp(...))``). Ops of the step
  outside the model are ``loss`` (differentiated) or ``update`` (Adam, BatchNorm statistics,
  metrics). XLA's layout pass drops the metadata of the convolutions it rewrites into kernel
  gradients: those are found by their fused convolution and the layer by their kernel's shape,
  and the batch-last copies that feed them (``transpose`` copies without metadata) are counted
  as ``layout copies`` under ``backward``. A fusion that spans layers counts under the layer of
  its metadata (its root's): in inference XLA fuses the last BatchNorm, the attention and the
  mean into one kernel, which then counts as ``embedding``. A convolution's backward is split
  further into ``dx`` (with the bias gradient) and ``dw`` (kernel gradient: a convolution with
  the kernel's shape, with or without metadata, or the ``while`` loop of
  ``conv_algorithm="taps"``).
* PyTorch: ``--steps`` calls under ``torch.profiler``; each op's self CPU time goes to the
  innermost named scope (``bench/torch_macnn.py`` names its forward's pieces with the same
  layer names), a backward op to the scope of the forward op that created it (autograd's
  sequence number), the optimiser's ops to ``update``.

Both report milliseconds per step per layer and direction (per op, the median over the
``--steps`` profiled steps: one slow step, a page-fault storm or another process, stays out),
the totals per kind of layer (``convolutions``, ``batch norm``, ``relu + max pool``,
``attention``, ``other``; in dkd-jax's HLO the backward selects of ReLU and of the max-pool
share one unscoped name, ``select_n``, so the two are one kind), dkd-jax's 20 costliest
instructions, the profiled step time against the unprofiled median (the profilers' own cost)
and what could not be attributed. The unprofiled steps run after the profiled ones and can
come out slower (the heap has grown around the profilers' buffers): for step times use
``compare_torch.py``; this script is for where the time goes. The thread budget is fixed as
in ``compare_torch.py`` (affinity, one-thread XLA, ``OMP_WAIT_POLICY=PASSIVE``), and so is the
host allocator (``dkd_jax.host_memory``). Prints JSON; writes it only with ``--out``.

  python bench/profile_step.py --shape 40x200 --batch 256 --threads 1
  python bench/profile_step.py --shape 40x200 --batch 256 --conv-algorithm taps --out ...
  python bench/profile_step.py --op inference --shape 26x63 --batch 32
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import benchjson  # bench/ (this script's folder) is on sys.path

ROOT = Path(__file__).resolve().parents[1]
PROG = "profile_step"

#: Layer → kind of layer, for the per-kind totals (first matching prefix).
KINDS = (
    ("conv", "convolutions"),
    ("layout copies", "convolutions"),
    ("bn", "batch norm"),
    ("relu", "relu + max pool"),
    ("max_pool", "relu + max pool"),
    # The backward selects of ReLU and of the max-pool's custom gradient keep no scope of
    # their own in the HLO metadata (``.../transpose(jvp(MACNN))/select_n``).
    ("select_n", "relu + max pool"),
    ("head_fusion", "attention"),
)

#: ``name = shape opcode(``; a shape may be a tuple, an opcode hyphenated (``all-reduce``).
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([\w\-]+)\(")
#: Where the model's scope ends in an op_name: "jvp(MACNN)/conv2/...",
#: "transpose(jvp(MACNN))/conv2/...", "MACNN/conv2/..." (inference).
_MODEL = re.compile(r"MACNN\)*/")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")


def kind_of(layer: str) -> str:
    for prefix, kind in KINDS:
        if layer.startswith(prefix):
            return kind
    return "other"


# --------------------------------------------------------------------------------------------
# dkd-jax: HLO metadata → (layer, direction)
# --------------------------------------------------------------------------------------------


def parse_hlo(text: str) -> tuple[dict, dict]:
    """``{instruction: (shape, opcode, op_name, called computation)}`` and ``{computation:
    [instruction lines]}`` of an optimized HLO module's text (the entry computation also under
    ``"ENTRY"``)."""
    instructions, computations, current = {}, {}, None
    for line in text.splitlines():
        m = _COMPUTATION.match(line)
        if m and " = " not in line:
            current = computations.setdefault(m.group(1), [])
            if line.startswith("ENTRY"):
                computations["ENTRY"] = current
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        op = re.search(r'op_name="([^"]*)"', line)
        calls = re.search(r"calls=%?([\w.\-]+)", line)
        instructions[m.group(1)] = (
            m.group(2),
            m.group(3),
            op.group(1) if op else "",
            calls.group(1) if calls else None,
        )
        if current is not None:
            current.append(line)
    return instructions, computations


def _dims(shape: str) -> tuple[int, ...]:
    """``f32[3,3,16,32]{...}`` → (3, 3, 16, 32); () for a tuple or scalar shape."""
    m = re.match(r"\w+\[([\d,]*)\]", shape)
    return tuple(int(d) for d in m.group(1).split(",") if d) if m else ()


def jax_attribution(
    name: str,
    instructions: dict,
    computations: dict,
    kernels: dict[tuple[int, ...], str],
    *,
    training: bool = True,
) -> tuple[str, str]:
    """(layer, direction) of one executed HLO instruction; direction is ``forward``,
    ``backward dx`` / ``backward dw`` (convolutions) or ``backward`` / ``update``.

    ``kernels``: sorted kernel dims → convolution name (:func:`kernel_shapes`). ``training``:
    False for an inference module, whose metadata-less copies are then ``forward``."""
    shape, opcode, op_name, calls = instructions[name]
    body = computations.get(calls, []) if calls else []
    is_conv = opcode == "convolution" or any(" convolution(" in line for line in body)
    if not op_name:
        inner = [re.search(r'op_name="([^"]*)"', line) for line in body]
        named = [m.group(1) for m in inner if m]
        if is_conv and not named:
            layer = kernels.get(tuple(sorted(_dims(shape))), "conv (unmatched kernel)")
            return layer, "backward dw"
        if not named:
            if "transpose" in name or "copy" in name:
                return "layout copies", "backward" if training else "forward"
            return "other", "update"
        op_name = named[0]
    backward = "transpose(" in op_name
    parts = _MODEL.split(op_name, maxsplit=1)
    if len(parts) == 1:
        if backward or "jvp(" in op_name:
            return "loss", "backward" if backward else "forward"
        return "update", "update"
    rest = parts[1]
    layer = rest.split("/")[0]
    layer = {"jit(relu)": "relu"}.get(layer, layer)
    if not backward:
        return layer, "forward"
    if layer.startswith("conv"):
        # The kernel gradient: an output of the kernel's shape (XLA keeps the metadata at some
        # shapes), or the per-tap loop of conv_algorithm="taps".
        kernel_shaped = is_conv and kernels.get(tuple(sorted(_dims(shape)))) == layer
        taps_dw = "/while" in rest or "closed_call" in rest
        return layer, "backward dw" if kernel_shaped or taps_dw else "backward dx"
    return layer, "backward"


def exclusive_times(events) -> list[tuple[str, float, float]]:
    """(name, start, exclusive duration) of one trace line's (name, start, duration) events:
    each event's duration minus those of the events nested in it."""
    out, stack = [], []  # stack of [name, start, end, duration, children]
    for name, start, duration in sorted(events, key=lambda e: (e[1], -e[2])):
        while stack and start >= stack[-1][2]:
            top = stack.pop()
            out.append((top[0], top[1], top[3] - top[4]))
        if stack:
            stack[-1][4] += duration
        stack.append([name, start, start + duration, duration, 0.0])
    out += [(top[0], top[1], top[3] - top[4]) for top in reversed(stack)]
    return out


def median_per_step(events, steps: int) -> dict[str, float]:
    """{name: median over the steps of its time per step}: each instruction runs the same
    number of times in every step (once, or once per loop iteration), so its occurrences in
    start order split evenly into ``steps`` consecutive groups. The median keeps one slow
    step (a page-fault storm, another process) out of the table."""
    by_name = collections.defaultdict(list)
    for name, start, duration in events:
        by_name[name].append((start, duration))
    out = {}
    for name, occurrences in by_name.items():
        occurrences.sort()
        per_step = len(occurrences) // steps
        if per_step == 0 or len(occurrences) % steps:  # not once per step: plain mean
            out[name] = sum(d for _, d in occurrences) / steps
            continue
        sums = [
            sum(d for _, d in occurrences[i * per_step : (i + 1) * per_step]) for i in range(steps)
        ]
        out[name] = statistics.median(sums)
    return out


def _trace_events(trace_dir: str) -> list[tuple[str, float, float]]:
    import jax

    files = sorted(Path(trace_dir).rglob("*.xplane.pb"))
    data = jax.profiler.ProfileData.from_file(str(files[-1]))
    out = []
    for plane in data.planes:
        for line in plane.lines:
            if "XLA" not in line.name:  # the XLA:CPU client and intra-op threads
                continue
            events = [
                (e.name, e.start_ns, e.duration_ns)
                for e in line.events
                if not e.name.startswith(("ThunkExecutor", "ThreadpoolListener", "end: "))
            ]
            out += exclusive_times(events)
    return out


def _step_module(dump_dir: str, names: set[str]) -> tuple[dict, dict, str]:
    """The dumped optimized module whose instruction names cover the profiled events best; of
    equals, the last compiled (XLA numbers its dumps in compile order: the model's ``init``
    holds the same forward ops as the inference function compiled after it)."""
    best = None
    for path in sorted(Path(dump_dir).glob("*after_optimizations.txt")):
        instructions, computations = parse_hlo(path.read_text())
        score = len(names & instructions.keys())
        if best is None or score >= best[0]:
            best = (score, instructions, computations, path.name)
    if best is None:
        raise SystemExit(f"{PROG}: error: XLA dumped no optimized module into {dump_dir}")
    return best[1], best[2], best[3]


def profile_ours(
    run, steps: int, dump_dir: str, kernels: dict, *, training: bool, top_n: int = 20
) -> dict:
    import jax

    with tempfile.TemporaryDirectory(prefix="dkd_jax_profile_") as trace_dir:
        jax.profiler.start_trace(trace_dir)
        t0 = time.perf_counter()
        for _ in range(steps):
            run()
        wall = time.perf_counter() - t0
        jax.profiler.stop_trace()
        events = _trace_events(trace_dir)
    instructions, computations, module = _step_module(dump_dir, {e[0] for e in events})
    table: dict[tuple[str, str], float] = collections.Counter()
    per_instruction = {}  # name: (ns per step, (layer, direction))
    unattributed = collections.Counter()
    for name, ns in median_per_step(events, steps).items():
        if name not in instructions:
            unattributed[name] += ns
            continue
        key = jax_attribution(name, instructions, computations, kernels, training=training)
        table[key] += ns
        per_instruction[name] = (ns, key)
    scale = 1e-6  # ns → ms (already per step)
    costliest = sorted(per_instruction.items(), key=lambda item: -item[1][0])[:top_n]
    top = [
        {
            "instruction": name,
            "layer": layer,
            "direction": direction,
            "shape": instructions[name][0].split("{")[0],
            "ms": round(ns * scale, 1),
        }
        for name, (ns, (layer, direction)) in costliest
    ]
    return {
        "module": module,
        "profiled_step_ms": round(1e3 * wall / steps, 1),
        "table": {k: v * scale for k, v in table.items()},
        "top_instructions": top,
        "unattributed_ms": {k: round(v * scale, 2) for k, v in unattributed.most_common(5)},
    }


# --------------------------------------------------------------------------------------------
# PyTorch: innermost named scope; backward ops through autograd's sequence numbers
# --------------------------------------------------------------------------------------------

_TORCH_SCOPES = re.compile(r"^(conv\w*|bn\w*|relu|max_pool|concatenate|head_fusion|embedding|"
                           r"classifier|loss)$")  # fmt: skip


def _torch_scope(event) -> str | None:
    e = event
    while e is not None:
        if _TORCH_SCOPES.match(e.name):
            return e.name
        if e.name.startswith("Optimizer."):
            return "update"
        e = e.cpu_parent
    return None


def _backward_node(event):
    e = event
    while e is not None:
        if e.name.startswith("autograd::engine::evaluate_function"):
            return e
        e = e.cpu_parent
    return None


def attribute_torch_events(events, steps: int = 1) -> tuple[dict, dict]:
    """({(layer, direction): self CPU µs per step}, {op name: unattributed µs per step}) of
    torch profiler events (``name``, ``cpu_parent``, ``sequence_nr``, ``self_cpu_time_total``,
    ``time_range.start``) of ``steps`` steps; per op, the median over the steps
    (:func:`median_per_step`)."""
    forward_scope = {}
    for e in events:
        if e.sequence_nr >= 0 and _backward_node(e) is None:
            scope = _torch_scope(e)
            if scope is not None:
                forward_scope.setdefault(e.sequence_nr, scope)
    rows = []
    for i, e in enumerate(events):
        node = _backward_node(e)
        if node is not None:
            scope = forward_scope.get(node.sequence_nr)
            key = (scope, "backward") if scope else None
        else:
            scope = _torch_scope(e)
            key = (scope, "update" if scope == "update" else "forward") if scope else None
        start = e.time_range.start if hasattr(e, "time_range") else i
        rows.append(((key, e.name), start, e.self_cpu_time_total))
    table: dict[tuple[str, str], float] = collections.Counter()
    unattributed = collections.Counter()
    for (key, name), us in median_per_step(rows, steps).items():
        if key is None:
            unattributed[name] += us
        else:
            table[key] += us
    return table, unattributed


def profile_theirs(run, steps: int) -> dict:
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            run()
        wall = time.perf_counter() - t0
    table, unattributed = attribute_torch_events(list(prof.events()), steps)
    scale = 1e-3  # µs → ms (already per step)
    return {
        "profiled_step_ms": round(1e3 * wall / steps, 1),
        "table": {k: v * scale for k, v in table.items()},
        "unattributed_ms": {k: round(v * scale, 2) for k, v in unattributed.most_common(5)},
    }


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _merge_backward(table: dict) -> dict:
    """Sums ``backward dx`` / ``backward dw`` into ``backward`` (PyTorch does not split them)."""
    out = collections.Counter()
    for (layer, direction), ms in table.items():
        out[(layer, "backward" if direction.startswith("backward") else direction)] += ms
    return out


def _row(ours_ms: float, theirs_ms: float, **labels) -> dict:
    return {**labels, "ours_ms": round(ours_ms, 1), "theirs_ms": round(theirs_ms, 1),
            "gap_ms": round(ours_ms - theirs_ms, 1)}  # fmt: skip


def compare(ours: dict, theirs: dict) -> dict:
    """Per (layer, direction) and per kind: ours, theirs and the gap (ours - theirs), ranked by
    the gap (largest first)."""
    mine, yours = _merge_backward(ours["table"]), _merge_backward(theirs["table"])
    rows = [
        _row(mine.get(key, 0.0), yours.get(key, 0.0), layer=key[0], direction=key[1])
        for key in sorted(set(mine) | set(yours))
    ]
    rows.sort(key=lambda r: -r["gap_ms"])
    kinds = collections.defaultdict(lambda: [0.0, 0.0])
    for (layer, direction), ms in mine.items():
        kinds[(kind_of(layer), direction)][0] += ms
    for (layer, direction), ms in yours.items():
        kinds[(kind_of(layer), direction)][1] += ms
    by_kind = [_row(a, b, kind=k, direction=d) for (k, d), (a, b) in kinds.items()]
    by_kind.sort(key=lambda r: -r["gap_ms"])
    split = collections.Counter()
    for (layer, direction), ms in ours["table"].items():
        if layer.startswith(("conv", "layout")) and direction.startswith("backward"):
            split[direction] += ms
    return {
        "by_kind": by_kind,
        "by_layer": rows,
        "ours_conv_backward_ms": {k: round(v, 1) for k, v in sorted(split.items())},
        "attributed_total_ms": {
            "ours": round(sum(mine.values()), 1),
            "theirs": round(sum(yours.values()), 1),
        },
    }


def kernel_shapes(variables) -> dict[tuple[int, ...], str]:
    """Sorted kernel dims → convolution name, to name XLA's metadata-less kernel gradients."""
    params = variables["params"]
    return {
        tuple(sorted(params[name]["kernel"].shape)): name
        for name in params
        if name.startswith("conv")
    }


def _step_ms(run) -> float:
    t0 = time.perf_counter()
    run()
    return 1e3 * (time.perf_counter() - t0)


def run(args, threads: dict, dump_dir: str) -> dict:
    import compare_torch
    import numpy as np

    rng = np.random.default_rng(0)
    features = rng.normal(size=(args.batch, *args.shape)).astype(np.float32)
    labels = (np.arange(args.batch) % 4).astype(np.int32)
    ours = compare_torch.build_ours(args.op, features, labels, conv_algorithm=args.conv_algorithm)
    theirs = compare_torch.build_theirs(args.op, features, labels, ours, device="cpu")
    for side in (ours, theirs):
        for _ in range(args.warmup):
            side.run()
    kernels = kernel_shapes(ours.variables())
    mine = profile_ours(ours.run, args.steps, dump_dir, kernels, training=args.op != "inference")
    yours = profile_theirs(theirs.run, args.steps)
    # Then unprofiled steps, interleaved, to show what the profilers cost (after the profiled
    # ones: the first steps of a process may still be growing its heap).
    plain = {"ours": [], "theirs": []}
    for _ in range(args.steps):
        plain["ours"].append(_step_ms(ours.run))
        plain["theirs"].append(_step_ms(theirs.run))
    report = {
        "benchmark": f"bench/{PROG}.py",
        "op": args.op,
        "shape": list(args.shape),
        "batch": args.batch,
        "conv_algorithm": args.conv_algorithm,
        "steps": args.steps,
        "threads": threads,
        "cpu": benchjson.cpu_model(),
        "step_ms": {
            "ours_unprofiled_median": round(statistics.median(plain["ours"]), 1),
            "theirs_unprofiled_median": round(statistics.median(plain["theirs"]), 1),
            "ours_profiled": mine["profiled_step_ms"],
            "theirs_profiled": yours["profiled_step_ms"],
        },
        "hlo_module": mine["module"],
        **compare(mine, yours),
        "ours_top_instructions": mine["top_instructions"],
        "unattributed_ms": {"ours": mine["unattributed_ms"], "theirs": yours["unattributed_ms"]},
    }
    return report


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--op", choices=("ce", "teacher_ce", "inference"), default="ce")
    p.add_argument("--shape", type=benchjson.shape_arg, default=(40, 200), help="FREQxTIME")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--conv-algorithm", choices=("xla", "taps_forward", "taps"), default="xla")
    p.add_argument("--steps", type=int, default=3, help="profiled steps per side (and unprofiled)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", help="also write the JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if problem := benchjson.out_problem(args.out):
        print(f"profile_step.py: error: {problem}", file=sys.stderr)
        return 2
    if args.batch < 1 or args.steps < 1 or args.warmup < 0:
        _parser().error("--batch and --steps must be >= 1, --warmup >= 0")
    sys.path[:0] = [p for p in (str(ROOT), str(ROOT / "bench")) if p not in sys.path]
    import compare_torch

    if importlib.util.find_spec("torch") is None:  # not imported yet: OMP settings first
        print(f"{PROG}: error: needs torch: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    load_before = [round(v, 2) for v in os.getloadavg()]
    # Before JAX starts: the thread budget, and the optimized HLO for the metadata.
    threads = compare_torch.configure_threads(args.threads, "cpu", "")
    with tempfile.TemporaryDirectory(prefix="dkd_jax_hlo_") as dump_dir:
        os.environ["XLA_FLAGS"] += f" --xla_dump_to={dump_dir} --xla_dump_hlo_as_text"
        from dkd_jax import host_memory

        threads["host_memory"] = host_memory.configure()
        import torch

        torch.set_num_threads(args.threads)
        report = run(args, threads, dump_dir)
    report["load_before"] = load_before
    report["load_after"] = [round(v, 2) for v in os.getloadavg()]
    return benchjson.emit(report, args.out, command=benchjson.command_line("profile_step.py", argv))


if __name__ == "__main__":
    sys.exit(main())
