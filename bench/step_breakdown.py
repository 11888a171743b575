"""Where a training step's time goes: the pieces of the student's step, dkd-jax against PyTorch.

Complements ``bench/compare_torch.py`` (which times whole steps): every piece is one plain
``jax.jit`` function (not the project's ``pmap`` step) and its PyTorch counterpart from
``bench/torch_macnn.py``, from the same weights, timed back to back (median of ``--iters``):

* ``student_forward_eval`` / ``student_forward_train`` / ``student_forward_backward`` (CE loss
  and gradients, BatchNorm in train mode) / ``student_step`` (+ Adam with coupled L2);
* ``teacher_forward_eval`` (the frozen teacher of a DKD step);
* ``maxpool_backward_*``: the two 2×2 max-pools of the trunk (forward + backward of a sum of
  squares) as ``flax.linen.max_pool`` (XLA ``select_and_scatter`` gradient), as a plain
  reshape + max, as the project's ``models.max_pool_2x2`` (strided slices, a select per window
  corner in the gradient: what training on CPU uses) and in PyTorch;
* ``conv_*``: every convolution of the trunk at its own input shape, three ways each: the
  forward, the input gradient (``dx``) and the kernel gradient (``dw``),
  ``lax.conv_general_dilated`` under ``jax.vjp`` against ``torch.nn.functional.conv2d`` /
  ``torch.nn.grad.conv2d_input`` / ``conv2d_weight`` (the first two convolutions' ``dx`` is never
  computed in training: their input is the data), plus what ``conv_algorithm="taps"`` replaces
  (``dkd_jax.conv_taps``): ``jax_taps_forward`` of the one-channel first convolutions and
  ``jax_taps_dw`` of the 3×3 stages; ``conv_totals_ms`` sums them per side;
* ``*_taps``: the student pieces with ``conv_algorithm="taps"``, against the same PyTorch code;
* ``bn_*_relu_*``: BatchNorm in training mode + ReLU, forward and backward, on each
  convolution's output shape; ``bn_relu_totals_ms`` sums them per side.

``--pieces`` picks some of ``student``, ``pools``, ``convs``, ``bn`` (default all).

The thread budget is fixed before JAX/PyTorch are imported, as in ``compare_torch.py``: with
``--threads`` below the cores available the process is pinned to that many cores, and one thread
adds ``--xla_cpu_multi_thread_eigen=false`` (``--xla-flags`` appends flags to try on the JAX side).
Prints JSON; writes it only with ``--out``.

  python bench/step_breakdown.py --threads 1 --shape 26x63 --batch 256
  python bench/step_breakdown.py --threads 1 --shape 40x200 --batch 256 --pieces bn
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

import benchjson

ROOT = Path(__file__).resolve().parents[1]


def _pin(threads: int, extra_xla_flags: str = "") -> None:
    cores = sorted(os.sched_getaffinity(0))
    if threads < len(cores):
        os.sched_setaffinity(0, cores[:threads])
    os.environ.update(OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE", JAX_PLATFORMS="cpu")
    base = "--xla_cpu_multi_thread_eigen=false" if threads == 1 else os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = " ".join(base.split() + extra_xla_flags.split())


def _median_ms(fn, iters: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(1e3 * statistics.median(times), 2)


def _student_pieces(shape, batch):
    """{name: (jax thunk, torch thunk)} for the model-level pieces."""
    import flax.linen as nn  # noqa: F401  (imported after pinning)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import torch
    import torch.nn.functional as F
    import torch_macnn as tm

    from dkd_jax import losses, models

    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, *shape)).astype(np.float32)
    y = (np.arange(batch) % 4).astype(np.int32)
    xs, ys = jnp.asarray(x)[..., None], jnp.asarray(y)
    student, teacher = models.build_model("student"), models.build_model("teacher")
    student_taps = models.build_model("student", conv_algorithm="taps")

    def init(model, seed):
        fn = jax.jit(lambda k: model.init(k, jnp.zeros((1, *shape, 1)), train=False))
        return fn(jax.random.key(seed, impl="rbg"))

    sv, tv = init(student, 0), init(teacher, 1)
    params, stats = sv["params"], sv["batch_stats"]

    def forward_train(p, x, model=student):
        return model.apply(
            {"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
        )

    def loss_fn(p, x, y, model=student):
        logits, updated = forward_train(p, x, model)
        return losses.cross_entropy(logits, y).mean(), updated

    def loss_taps(p, x, y):
        return loss_fn(p, x, y, student_taps)

    tx = optax.chain(
        optax.add_decayed_weights(1e-6), optax.scale_by_adam(), optax.scale_by_learning_rate(1e-3)
    )
    opt_state = tx.init(params)

    def step(p, o, x, y, loss_fn=loss_fn):
        (loss, updated), g = jax.value_and_grad(loss_fn, has_aux=True)(p, x, y)
        updates, o = tx.update(g, o, p)
        return optax.apply_updates(p, updates), updated, o, loss

    jitted = {
        "student_forward_eval": (jax.jit(lambda v, x: student.apply(v, x, train=False)), (sv, xs)),
        "student_forward_train": (jax.jit(forward_train), (params, xs)),
        "student_forward_backward": (
            jax.jit(jax.value_and_grad(loss_fn, has_aux=True)),
            (params, xs, ys),
        ),
        "student_step": (jax.jit(step), (params, opt_state, xs, ys)),
        "teacher_forward_eval": (jax.jit(lambda v, x: teacher.apply(v, x, train=False)), (tv, xs)),
        # conv_algorithm="taps" (dkd_jax.conv_taps), against the same PyTorch pieces.
        "student_forward_eval_taps": (
            jax.jit(lambda v, x: student_taps.apply(v, x, train=False)),
            (sv, xs),
        ),
        "student_forward_backward_taps": (
            jax.jit(jax.value_and_grad(loss_taps, has_aux=True)),
            (params, xs, ys),
        ),
        "student_step_taps": (
            jax.jit(lambda p, o, x, y: step(p, o, x, y, loss_taps)),
            (params, opt_state, xs, ys),
        ),
    }
    ts = tm.load_flax_variables(tm.build("student"), sv)
    tt = tm.load_flax_variables(tm.build("teacher"), tv)
    opt = tm.make_optimizer(ts)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()

    def torch_forward_train():
        ts.train()
        with torch.no_grad():
            ts(xt)

    def torch_forward_backward():
        ts.train()
        loss = F.cross_entropy(ts(xt), yt)
        opt.zero_grad(set_to_none=True)
        loss.backward()

    torch_fns = {
        "student_forward_eval": lambda: tm.predict(ts, xt),
        "student_forward_train": torch_forward_train,
        "student_forward_backward": torch_forward_backward,
        "student_step": lambda: tm.ce_step(ts, opt, xt, yt),
        "teacher_forward_eval": lambda: tm.predict(tt, xt),
    }
    for name in ("student_forward_eval", "student_forward_backward", "student_step"):
        torch_fns[name + "_taps"] = torch_fns[name]
    return {
        name: (lambda fn=fn, args=args: jax.block_until_ready(fn(*args)), torch_fns[name])
        for name, (fn, args) in jitted.items()
    }


def _pool_pieces(shape, batch):
    """The two max-pools' forward + backward, four ways, on the trunk's pooled map shapes."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import torch.nn.functional as F

    from dkd_jax import models

    h, w = shape[0] - 1, shape[1] - 1  # after the first convolutions
    out = {}
    rng = np.random.default_rng(1)
    for name, (hh, ww, c) in {"pool1": (h, w, 32), "pool2": (h // 2, w // 2, 48)}.items():
        x = rng.normal(size=(batch, hh, ww, c)).astype(np.float32)
        xj = jnp.asarray(x)

        def reshape_max(v):
            b, hv, wv, cv = v.shape
            v = v[:, : hv // 2 * 2, : wv // 2 * 2]
            return v.reshape(b, hv // 2, 2, wv // 2, 2, cv).max(axis=(2, 4))

        flax_grad = jax.jit(jax.grad(lambda v: (nn.max_pool(v, (2, 2), (2, 2)) ** 2).sum()))
        reshape_grad = jax.jit(jax.grad(lambda v: (reshape_max(v) ** 2).sum()))
        project_grad = jax.jit(jax.grad(lambda v: (models.max_pool_2x2(v) ** 2).sum()))
        xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).requires_grad_(True)

        def torch_grad(xt=xt):
            (F.max_pool2d(xt, 2) ** 2).sum().backward()
            xt.grad = None

        out[f"maxpool_backward_{name}_{hh}x{ww}x{c}"] = {
            "jax_select_and_scatter": lambda f=flax_grad, v=xj: f(v).block_until_ready(),
            "jax_reshape_max": lambda f=reshape_grad, v=xj: f(v).block_until_ready(),
            "jax_max_pool_2x2": lambda f=project_grad, v=xj: f(v).block_until_ready(),
            "torch": torch_grad,
        }
    return out


def _first_conv_output(shape):
    """(H, W) after the first convolutions (stride 1; they agree, see models.feature_map_size)."""
    from dkd_jax import models

    kernel, (pad_f, pad_t) = next(iter(models.FIRST_CONVS.values()))
    return (shape[0] + sum(pad_f) - kernel[0] + 1, shape[1] + sum(pad_t) - kernel[1] + 1)


def _conv_totals(pieces):
    """Sums over the convolutions of what training computes: every forward and kernel gradient,
    and the input gradient of all but the first convolutions (whose input is the data). Sides:
    ``jax`` (XLA's convolutions), ``taps`` (``conv_algorithm="taps"``: the tap-by-tap forward
    or kernel gradient where the layer has one, XLA's otherwise) and ``torch``."""
    from dkd_jax import models

    first = tuple(f"conv_{name}_" for name in models.FIRST_CONVS)
    convs = {k: v for k, v in pieces.items() if k.startswith("conv_")}

    def cost(c, side, part):
        if side == "taps":
            return c.get(f"jax_taps_{part}", c[f"jax_{part}"])
        return c[f"{side}_{part}"]

    return {
        part: {
            side: round(
                sum(
                    cost(c, side, part)
                    for k, c in convs.items()
                    if part != "dx" or not k.startswith(first)
                ),
                2,
            )
            for side in ("jax", "taps", "torch")
        }
        for part in ("forward", "dx", "dw")
    }


def _conv_pieces(shape, batch):
    """Each trunk convolution's forward, input gradient and kernel gradient, JAX and PyTorch."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from dkd_jax import conv_taps, models

    layers = [  # (name, (H, W) of the input, in, out, kernel, padding)
        *(
            (name, shape, 1, models.FIRST_CONV_CHANNELS, kernel, pad)
            for name, (kernel, pad) in models.FIRST_CONVS.items()
        ),
    ]
    hw = _first_conv_output(shape)
    channels = len(models.FIRST_CONVS) * models.FIRST_CONV_CHANNELS
    for name, features, pool in models.STAGES:
        layers.append((name, hw, channels, features, (3, 3), ((1, 1), (1, 1))))
        hw, channels = ((hw[0] // 2, hw[1] // 2) if pool else hw), features
    rng = np.random.default_rng(2)
    out = {}
    for name, (h, w), cin, cout, kernel, pad in layers:
        x = rng.normal(size=(batch, h, w, cin)).astype(np.float32)
        k = (0.1 * rng.normal(size=(*kernel, cin, cout))).astype(np.float32)

        def conv(x, k, pad=pad):
            return jax.lax.conv_general_dilated(
                x, k, (1, 1), pad, dimension_numbers=("NHWC", "HWIO", "NHWC")
            )

        xj, kj = jnp.asarray(x), jnp.asarray(k)
        g = jnp.full(conv(xj, kj).shape, 0.01, jnp.float32)
        fwd = jax.jit(conv)
        dx = jax.jit(lambda x, k, g, conv=conv: jax.vjp(lambda x: conv(x, k), x)[1](g)[0])
        dw = jax.jit(lambda x, k, g, conv=conv: jax.vjp(lambda k: conv(x, k), k)[1](g)[0])
        xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        kt = torch.from_numpy(np.ascontiguousarray(k.transpose(3, 2, 0, 1)))
        gt = torch.from_numpy(np.ascontiguousarray(np.asarray(g).transpose(0, 3, 1, 2)))
        tpad = (pad[0][0], pad[1][0])

        def t_fwd(xt=xt, kt=kt, tpad=tpad):
            with torch.no_grad():
                torch.nn.functional.conv2d(xt, kt, padding=tpad)

        if cin == 1:  # conv_algorithm="taps": this layer's forward is summed tap by tap
            taps_fn = jax.jit(lambda x, k, pad=pad: conv_taps.single_channel_tap_conv(x, k, pad))
            taps = {"jax_taps_forward": lambda f=taps_fn, a=(xj, kj): f(*a).block_until_ready()}
        else:  # ... and this one's kernel gradient
            taps_fn = jax.jit(
                lambda x, g, kernel=kernel, pad=pad: conv_taps.kernel_gradient(x, g, kernel, pad)
            )
            taps = {"jax_taps_dw": lambda f=taps_fn, a=(xj, g): f(*a).block_until_ready()}
        out[f"conv_{name}_{h}x{w}x{cin}_to_{cout}"] = {
            **taps,
            "jax_forward": lambda f=fwd, a=(xj, kj): f(*a).block_until_ready(),
            "torch_forward": t_fwd,
            "jax_dx": lambda f=dx, a=(xj, kj, g): f(*a).block_until_ready(),
            "torch_dx": lambda xt=xt, kt=kt, gt=gt, p=tpad: torch.nn.grad.conv2d_input(
                xt.shape, kt, gt, padding=p
            ),
            "jax_dw": lambda f=dw, a=(xj, kj, g): f(*a).block_until_ready(),
            "torch_dw": lambda xt=xt, kt=kt, gt=gt, p=tpad: torch.nn.grad.conv2d_weight(
                xt, kt.shape, gt, padding=p
            ),
        }
    return out


def _bn_relu_pieces(shape, batch):
    """BatchNorm (training mode: batch statistics, running averages updated) + ReLU, forward
    and backward (input, scale and bias gradients), on every convolution's output shape, as the
    trunk computes it after each convolution: JAX (``flax.linen.BatchNorm``, as ``models``
    builds it) against PyTorch (``F.batch_norm(training=True)``)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import torch.nn.functional as F

    from dkd_jax import models

    hw = _first_conv_output(shape)
    maps = [(f"bn_{name}", hw, models.FIRST_CONV_CHANNELS) for name in models.FIRST_CONVS]
    for name, features, pool in models.STAGES:
        maps.append((f"bn_{name}", hw, features))
        hw = (hw[0] // 2, hw[1] // 2) if pool else hw
    rng = np.random.default_rng(3)
    out = {}
    for name, (h, w), c in maps:
        x = rng.normal(size=(batch, h, w, c)).astype(np.float32)
        g = (0.01 * rng.normal(size=x.shape)).astype(np.float32)
        bn = nn.BatchNorm(
            use_running_average=False, momentum=models._BN_MOMENTUM, epsilon=models._BN_EPSILON
        )
        variables = bn.init(jax.random.key(0), jnp.zeros((1, h, w, c)))

        def loss(p, x, g, bn=bn, stats=variables["batch_stats"]):
            y, updated = bn.apply({"params": p, "batch_stats": stats}, x, mutable=["batch_stats"])
            return (nn.relu(y) * g).sum(), updated

        grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
        args = (variables["params"], jnp.asarray(x), jnp.asarray(g))
        xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).requires_grad_(True)
        gt = torch.from_numpy(np.ascontiguousarray(g.transpose(0, 3, 1, 2)))
        weight = torch.ones(c, requires_grad=True)
        bias = torch.zeros(c, requires_grad=True)
        mean, var = torch.zeros(c), torch.ones(c)

        def torch_grad(xt=xt, gt=gt, weight=weight, bias=bias, mean=mean, var=var):
            y = F.batch_norm(
                xt, mean, var, weight, bias, True, 1 - models._BN_MOMENTUM, models._BN_EPSILON
            )
            (F.relu(y) * gt).sum().backward()
            xt.grad = weight.grad = bias.grad = None

        out[f"{name}_relu_{h}x{w}x{c}"] = {
            "jax": lambda f=grad, a=args: jax.block_until_ready(f(*a)),
            "torch": torch_grad,
        }
    return out


PIECES = ("student", "pools", "convs", "bn")


def _pieces_arg(text: str) -> list[str]:
    parts = [part.strip() for part in text.split(",")]
    unknown = sorted(set(parts) - set(PIECES))
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"choose from {','.join(PIECES)}, got {text!r}")
    return [part for part in PIECES if part in parts]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--shape", type=benchjson.shape_arg, default=(26, 63), help="freq x time")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--iters", type=int, default=5, help="timed calls per piece (median)")
    p.add_argument("--xla-flags", default="", help="extra XLA_FLAGS for the JAX side")
    p.add_argument(
        "--pieces",
        type=_pieces_arg,
        default=list(PIECES),
        help=f"which pieces to time, comma-separated (default all: {','.join(PIECES)})",
    )
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    benchjson.check_out(p, args.out)
    if importlib.util.find_spec("torch") is None:  # not imported yet: thread settings first
        print("step_breakdown.py: error: needs torch: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    shape = args.shape
    _pin(args.threads, args.xla_flags)
    sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
    from dkd_jax import host_memory

    host_memory_state = host_memory.configure()  # both sides: one malloc per process
    import torch

    torch.set_num_threads(args.threads)
    report = {
        "benchmark": "bench/step_breakdown.py",
        "threads": args.threads,
        "affinity": sorted(os.sched_getaffinity(0)),
        "shape": list(shape),
        "batch": args.batch,
        "iters": args.iters,
        "xla_flags": os.environ["XLA_FLAGS"],
        "host_memory": host_memory_state,
        "load_before": list(os.getloadavg()),
        "pieces_ms": {},
    }
    report["pieces"] = args.pieces
    if "student" in args.pieces:
        for name, (jax_fn, torch_fn) in _student_pieces(shape, args.batch).items():
            j, t = _median_ms(jax_fn, args.iters), _median_ms(torch_fn, args.iters)
            report["pieces_ms"][name] = {"jax": j, "torch": t, "torch_over_jax": round(t / j, 3)}
            print(f"{name}: jax {j} ms, torch {t} ms", file=sys.stderr, flush=True)
    builders = {"pools": _pool_pieces, "convs": _conv_pieces, "bn": _bn_relu_pieces}
    pieces = {}
    for part, build in builders.items():
        if part in args.pieces:
            pieces.update(build(shape, args.batch))
    for name, variants in pieces.items():
        report["pieces_ms"][name] = {k: _median_ms(fn, args.iters) for k, fn in variants.items()}
        print(f"{name}: {report['pieces_ms'][name]}", file=sys.stderr, flush=True)
    if "convs" in args.pieces:
        report["conv_totals_ms"] = _conv_totals(report["pieces_ms"])
    if "bn" in args.pieces:
        bn = [v for k, v in report["pieces_ms"].items() if k.startswith("bn_")]
        report["bn_relu_totals_ms"] = {
            side: round(sum(v[side] for v in bn), 2) for side in ("jax", "torch")
        }
    report["load_after"] = list(os.getloadavg())
    return benchjson.emit(
        report, args.out, command=benchjson.command_line("step_breakdown.py", argv)
    )


if __name__ == "__main__":
    sys.exit(main())
