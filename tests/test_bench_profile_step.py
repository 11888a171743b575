"""bench/profile_step.py attributes profiled time to the right layers, on both sides.

Its numbers belong in ``bench/results/``; what is tested here is the attribution: the nesting
arithmetic of trace events, the reading of real XLA:CPU HLO metadata (a compiled gradient of
the real network, so that a change in JAX's op names breaks this test and not a silent table),
and the mapping of PyTorch profiler events, backward ones through autograd's sequence numbers.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def ps(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(
        "bench_profile_step", ROOT / "bench/profile_step.py"
    )
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_exclusive_times_subtract_nested_events(ps):
    events = [
        ("loop", 0, 100),  # holds body.a and body.b
        ("body.a", 10, 20),
        ("body.b", 40, 10),
        ("inner", 42, 5),  # inside body.b
        ("next", 100, 20),  # starts where loop ends: a sibling, not a child
    ]
    got = {name: (start, d) for name, start, d in ps.exclusive_times(events)}
    assert got == {
        "loop": (0, 70), "body.a": (10, 20), "body.b": (40, 5), "inner": (42, 5),
        "next": (100, 20),
    }  # fmt: skip
    assert sum(d for _, d in got.values()) == 120  # the wall time the events cover


def test_median_per_step_splits_occurrences_evenly(ps):
    # "conv" once per step (one slow step), "dot" twice per step (a loop), "odd" 4 in 3 steps.
    events = [("conv", 0, 10.0), ("conv", 100, 50.0), ("conv", 200, 12.0)]
    events += [("dot", t, 1.0 + (t >= 100)) for t in (5, 6, 105, 106, 205, 206)]
    events += [("odd", t, 3.0) for t in (1, 2, 3, 4)]
    got = ps.median_per_step(events, 3)
    assert got == {"conv": 12.0, "dot": 4.0, "odd": 4.0}


_HLO = """\
HloModule jit_step

%fused_dw (p0: f32[16,9,9,8], p1: f32[9,9,8,32]) -> f32[16,3,3,32] {
  %p0 = f32[16,9,9,8]{3,2,1,0} parameter(0)
  %p1 = f32[9,9,8,32]{3,2,1,0} parameter(1)
  ROOT %convolution.3 = f32[16,3,3,32]{3,2,1,0} convolution(%p0, %p1), window={size=9x9}
}

%fused_bn (p0: f32[8,9,9,32]) -> f32[8,9,9,32] {
  %p0 = f32[8,9,9,32]{3,2,1,0} parameter(0)
  ROOT %m = f32[8,9,9,32]{3,2,1,0} multiply(%p0, %p0), metadata={op_name="jit(step)/transpose(jvp(MACNN))/bn2/mul"}
}

ENTRY %main (x: f32[8,9,9,16]) -> f32[16,3,3,32] {
  %x = f32[8,9,9,16]{3,2,1,0} parameter(0)
  %conv.1 = f32[8,9,9,32]{3,2,1,0} convolution(%x, %x), metadata={op_name="jit(step)/jvp(MACNN)/conv2/conv_general_dilated"}
  %conv.2 = f32[8,9,9,16]{3,2,1,0} convolution(%x, %x), metadata={op_name="jit(step)/transpose(jvp(MACNN))/conv2/conv_general_dilated"}
  %conv.3 = f32[3,3,16,32]{3,2,1,0} convolution(%x, %x), metadata={op_name="jit(step)/transpose(jvp(MACNN))/conv2/conv_general_dilated"}
  %transpose_copy_fusion = f32[16,9,9,8]{3,2,1,0} fusion(%x), kind=kLoop, calls=%fused_bn_unused
  %ynn_fusion = f32[16,3,3,32]{3,2,1,0} fusion(%transpose_copy_fusion, %x), kind=kCustom, calls=%fused_dw
  %fusion.7 = f32[8,9,9,32]{3,2,1,0} fusion(%conv.1), kind=kLoop, calls=%fused_bn
  %dot.4 = f32[16,32]{1,0} dot(%x, %x), metadata={op_name="jit(step)/transpose(jvp(MACNN))/conv2/while/body/closed_call/dot_general"}
  %all-reduce.2 = f32[32]{0} all-reduce(%x), metadata={op_name="jit(step)/jvp(MACNN)/bn2/psum"}
  %while.1 = (s32[], f32[9,16,32]{2,1,0}) while(%x), condition=%c, body=%b
  %sel = f32[8,9,9,32]{3,2,1,0} select(%x, %x, %x), metadata={op_name="jit(step)/transpose(jvp(MACNN))/select_n"}
  %ls = f32[8,4]{1,0} exponential(%x), metadata={op_name="jit(step)/jvp(cross_entropy)/exp"}
  %lsb = f32[8,4]{1,0} multiply(%x, %x), metadata={op_name="jit(step)/transpose(jvp(cross_entropy))/mul"}
  %adam = f32[3,3,16,32]{3,2,1,0} add(%x, %x), metadata={op_name="jit(step)/add"}
  %inf = f32[8,9,9,32]{3,2,1,0} convolution(%x, %x), metadata={op_name="jit(predict)/MACNN/conv2/conv_general_dilated"}
}
"""  # noqa: E501  (HLO lines as XLA prints them)


def test_hlo_metadata_gives_layer_and_direction(ps):
    instructions, computations = ps.parse_hlo(_HLO)
    kernels = {(3, 3, 16, 32): "conv2"}

    def who(name, **kw):
        return ps.jax_attribution(name, instructions, computations, kernels, **kw)

    assert who("conv.1") == ("conv2", "forward")
    assert who("conv.2") == ("conv2", "backward dx")
    assert who("conv.3") == ("conv2", "backward dw")  # kernel-shaped convolution
    assert who("ynn_fusion") == ("conv2", "backward dw")  # metadata-less, named by its shape
    assert who("transpose_copy_fusion") == ("layout copies", "backward")
    assert who("transpose_copy_fusion", training=False) == ("layout copies", "forward")
    assert who("fusion.7") == ("bn2", "backward")  # metadata from inside the fusion
    assert who("dot.4") == ("conv2", "backward dw")  # conv_algorithm="taps" loop
    assert who("all-reduce.2") == ("bn2", "forward")  # hyphenated opcode
    assert instructions["while.1"][1] == "while"  # tuple-shaped instruction parsed
    assert who("while.1") == ("other", "update")
    assert who("sel") == ("select_n", "backward")
    assert who("ls") == ("loss", "forward") and who("lsb") == ("loss", "backward")
    assert who("adam") == ("update", "update")
    assert who("inf") == ("conv2", "forward")
    assert ps.kind_of("select_n") == ps.kind_of("relu") == ps.kind_of("max_pool")
    assert ps.kind_of("layout copies") == ps.kind_of("conv5") == "convolutions"


def test_real_gradient_hlo_is_attributed_to_every_layer(ps):
    """The optimized HLO of the real network's loss gradient: every convolution and BatchNorm
    layer gets forward and backward time, every convolution its kernel gradient, and no
    instruction of the model is left to ``other``."""
    from dkd_jax import losses, models

    model = models.build_model("tiny")
    shape = (26, 63)
    # jitted: an eager init compiles each of its ~90 operations on its own
    init = jax.jit(lambda key, x: model.init(key, x, train=False))
    variables = init(jax.random.PRNGKey(0), jnp.zeros((1, *shape, 1)))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, *shape, 1)), jnp.float32)
    y = jnp.arange(4) % 4

    def loss(params):
        logits, _ = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        return losses.cross_entropy(logits, y).mean()

    text = jax.jit(jax.grad(loss)).lower(variables["params"]).compile().as_text()
    instructions, computations = ps.parse_hlo(text)
    kernels = ps.kernel_shapes(variables)
    assert len(kernels) == 6  # conv1a, conv1b, conv2..conv5: shapes all different
    skip = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast"}
    executed = [  # what the profile sees: the entry computation's instructions
        ps._INSTR.match(line).group(1) for line in computations["ENTRY"]
    ]
    executed = [n for n in executed if instructions[n][1] not in skip]
    got = {ps.jax_attribution(n, instructions, computations, kernels) for n in executed}
    layers = {layer for layer, _ in got}
    convs = ["conv1a", "conv1b", "conv2", "conv3", "conv4", "conv5"]
    for conv in convs:
        assert (conv, "forward") in got and (conv, "backward dw") in got, conv
    for conv in convs[2:]:  # the first convolutions' input is the data: no dx
        assert (conv, "backward dx") in got, conv
    assert {"bn2", "head_fusion", "classifier", "max_pool", "loss"} <= layers
    assert ("head_fusion", "backward") in got and ("bn2", "backward") in got
    model_ops = [n for n in executed if "MACNN" in instructions[n][2]]
    assert len(model_ops) > 50 and all(
        ps.jax_attribution(n, instructions, computations, kernels)[0] not in ("other", "update")
        for n in model_ops
    )


def _event(name, parent=None, seq=-1, us=0.0):
    return SimpleNamespace(name=name, cpu_parent=parent, sequence_nr=seq, self_cpu_time_total=us)


def test_torch_events_go_to_their_scope_and_backward_to_the_forward_scope(ps):
    conv2 = _event("conv2")
    conv_op = _event("aten::convolution", conv2, seq=7, us=10.0)
    mkldnn = _event("aten::mkldnn_convolution", conv_op, seq=-1, us=30.0)
    relu = _event("relu")
    relu_op = _event("aten::relu", relu, seq=8, us=2.0)
    node = _event("autograd::engine::evaluate_function: ConvolutionBackward0", None, seq=7, us=1.0)
    conv_bwd = _event("aten::convolution_backward", node, seq=-1, us=50.0)
    node_relu = _event("autograd::engine::evaluate_function: ReluBackward0", None, seq=8, us=0.5)
    opt = _event("Optimizer.step#Adam.step", None, us=3.0)
    foreach = _event("aten::_foreach_add_", opt, us=4.0)
    stray = _event("aten::unsqueeze", None, seq=1, us=0.25)
    orphan = _event("autograd::engine::evaluate_function: CopyBackwards", None, seq=99, us=0.75)
    events = [conv2, conv_op, mkldnn, relu, relu_op, node, conv_bwd, node_relu, opt, foreach]
    table, unattributed = ps.attribute_torch_events([*events, stray, orphan])
    assert table == {
        ("conv2", "forward"): 40.0,
        ("conv2", "backward"): 51.0,
        ("relu", "forward"): 2.0,
        ("relu", "backward"): 0.5,
        ("update", "update"): 7.0,
    }
    assert unattributed == {"aten::unsqueeze": 0.25, orphan.name: 0.75}


def test_compare_merges_dx_dw_and_ranks_the_gaps(ps):
    ours = {
        "table": {
            ("conv2", "backward dx"): 3.0,
            ("conv2", "backward dw"): 5.0,
            ("layout copies", "backward"): 1.0,
            ("bn2", "forward"): 1.0,
            ("select_n", "backward"): 0.5,
        }
    }
    theirs = {
        "table": {("conv2", "backward"): 4.0, ("bn2", "forward"): 2.0, ("relu", "backward"): 1.5}
    }
    report = ps.compare(ours, theirs)
    first = report["by_layer"][0]
    assert (first["layer"], first["direction"], first["gap_ms"]) == ("conv2", "backward", 4.0)
    kinds = {(r["kind"], r["direction"]): (r["ours_ms"], r["theirs_ms"]) for r in report["by_kind"]}
    assert kinds[("convolutions", "backward")] == (9.0, 4.0)
    assert kinds[("relu + max pool", "backward")] == (0.5, 1.5)
    assert kinds[("batch norm", "forward")] == (1.0, 2.0)
    assert report["ours_conv_backward_ms"] == {
        "backward": 1.0,
        "backward dw": 5.0,
        "backward dx": 3.0,
    }
    assert report["attributed_total_ms"] == {"ours": 10.5, "theirs": 7.5}


def test_profile_step_without_torch_says_so_in_one_line(ps, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        ps.importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a)
    )
    assert ps.main(["--steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "profile_step: error: needs torch: pip install -e '.[bench]'"
