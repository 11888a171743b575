"""Tests for dkd_jax.export: ONNX and StableHLO parity with the Flax model, model.json, CLI.

Parity uses the real architectures (student, teacher, area-attention teacher) with initialised
weights whose BatchNorm statistics are randomised (so inference-mode BatchNorm matters) and
whose classifier is scaled so the largest logit is 5 (a 1e-5 check on the ~0.1 logits of
an initialised model would say little) (a 1e-5 check on near-zero logits would
say little), on real prep windows (the conftest MFCC-26 prep) at batch 1 and 256. The whole
export of a run uses the tiny trained run of tests/helpers_export.py.
"""

import functools
import hashlib
import json
from pathlib import Path

import helpers_export
import jax
import numpy as np
import pytest

pytest.importorskip("jax2onnx", reason="needs the export extra: pip install -e '.[export]'")
onnx = pytest.importorskip("onnx", reason="needs the export extra")
pytest.importorskip("onnxruntime", reason="needs the export extra")

from dkd_jax import export, models, records, train_state  # noqa: E402
from dkd_jax import run_dir as run_dir_lib  # noqa: E402

PRESETS = ("student", "teacher", "area_teacher")
TOL = 1e-5
# The tiny run's classifier standardises an embedding that barely varies with the input
# (helpers_export.spread_classifier: kernel entries ~1e5), so its logits are differences of
# terms far larger than themselves and carry the trunk's float32 rounding times those terms.
# Its export is checked relative to them (see _final_layer_scale): 1e-5 of the largest sum
# |embedding| · |kernel| + |bias|. Measured: 2.0e-6 of it for ONNX (1.1e-4 at a scale of 56 on
# noise windows, AMD EPYC with AVX-512; under 1e-4 on the earlier machines), 5.8e-7 for StableHLO.
TINY_REL = 1e-5


def _final_layer_scale(model, variables, x: np.ndarray) -> float:
    """max over windows and classes of sum_i |embedding_i · kernel_ij| + |bias_j| (float64):
    the size of the terms the classifier adds up into each logit."""

    def embedding(variables, x):
        _, inter = model.apply(variables, x, train=False, mutable=["intermediates"])
        return inter["intermediates"]["embedding"][0]

    e = np.abs(np.asarray(jax.jit(embedding)(variables, x), np.float64))
    head = variables["params"]["classifier"]
    kernel = np.abs(np.asarray(head["kernel"], np.float64))
    return float((e @ kernel + np.abs(np.asarray(head["bias"], np.float64))).max())


@pytest.fixture(scope="module")
def real_windows(tiny_prep_dir):
    """256 real eval windows [256, 26, 63] (tiled), standardised per band like training data."""
    x = records.load_split(tiny_prep_dir, "eval").features
    x = (x - x.mean(axis=(0, 2), keepdims=True)) / x.std(axis=(0, 2), keepdims=True)
    return np.resize(x, (256, *x.shape[1:])).astype(np.float32)


@functools.cache
def _forward(model):
    """The Flax model's eval-mode logits, jitted once per model (eager ``apply`` would compile
    every layer's operations one by one)."""
    return jax.jit(lambda variables, x: model.apply(variables, x, train=False))


def _variables(model, x):
    variables = train_state.init_variables(jax.random.PRNGKey(0), model, x.shape[1:])
    rng = np.random.default_rng(1)
    stats = jax.tree.map(np.asarray, variables["batch_stats"])
    for layer in stats.values():
        layer["mean"] = rng.normal(0.0, 0.3, layer["mean"].shape).astype(np.float32)
        layer["var"] = rng.uniform(0.5, 2.0, layer["var"].shape).astype(np.float32)
    params = jax.tree.map(np.asarray, variables["params"])
    variables = {"params": params, "batch_stats": stats}
    head = params["classifier"]
    head["bias"] = np.zeros_like(head["bias"])
    logits = np.asarray(_forward(model)(variables, x[..., None]))
    head["kernel"] = head["kernel"] * np.float32(5.0 / np.abs(logits).max())
    return variables


@pytest.mark.parametrize("preset", PRESETS)
def test_onnx_and_stablehlo_match_flax(preset, real_windows, tmp_path):
    model = models.build_model(preset, num_classes=4)
    variables = _variables(model, real_windows)
    fn = export.inference_function(model, variables)
    shape = real_windows.shape[1:]
    onnx_path = export.to_onnx(fn, shape, tmp_path / "m.onnx")
    hlo = export.load_stablehlo(export.to_stablehlo(fn, shape, tmp_path / "m.stablehlo"))
    for batch in (1, 256):
        x = real_windows[:batch, ..., None]
        ref = np.asarray(_forward(model)(variables, x))  # the Flax model
        assert np.abs(ref).max() > 1.0  # logits large enough for 1e-5 to mean something
        np.testing.assert_allclose(export.onnx_logits(onnx_path, x), ref, rtol=0, atol=TOL)
        np.testing.assert_allclose(np.asarray(hlo.call(x)), ref, rtol=0, atol=TOL)
    # a standard, BatchNorm-folded graph with a symbolic batch; a symbolic StableHLO batch
    proto = onnx.load(onnx_path)
    ops = {n.op_type for n in proto.graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", export.DEFAULT_OPSET)]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [*shape, 1]
    assert proto.graph.input[0].name == "features" and proto.graph.output[0].name == "logits"
    assert str(hlo.in_avals[0].shape[0]) == "batch" and hlo.out_avals[0].shape[1] == 4
    assert set(hlo.platforms) == set(export.STABLEHLO_PLATFORMS)


def _nested_calls(jaxpr) -> list[str]:
    """Names of the nested ``jit``/call equations anywhere in ``jaxpr`` (sub-jaxprs included)."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("pjit", "jit", "closed_call", "core_call"):
            found.append(str(eqn.params.get("name", eqn.primitive.name)))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _nested_calls(inner)
    return found


def test_parity_reference_is_the_model_with_variables_as_arguments():
    """export_run checks the exported graphs against _reference_logits. Constant-valued conv
    kernels, compiled as constants, gave NaN or varying logits on XLA:CPU (jax 0.10.2); the
    reference passes the variables as arguments and matches the eager forward exactly."""
    model = models.build_model("tiny", conv_algorithm="taps")
    x = np.random.default_rng(2).standard_normal((2, 16, 24, 1)).astype(np.float32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x[:1], train=False))
    variables = jax.tree.map(lambda s: np.full(s.shape, 0.1, np.float32), shapes)
    eager = np.asarray(export.inference_function(model, variables)(x))
    assert np.all(np.isfinite(eager))
    for _ in range(2):
        ref = export._reference_logits(model, variables, x)
        np.testing.assert_allclose(ref, eager, rtol=1e-5)


@pytest.mark.parametrize("chunk", [None, 8])
def test_converter_gets_no_nested_jit_and_the_same_numbers(real_windows, chunk):
    # jnp.cumsum / jnp.pad (area attention's summed-area table) trace to nested jit equations,
    # which jax2onnx 0.13.0 cannot convert from jax 0.11 on; to_onnx inlines them first (and
    # unrolls the query-chunk loop when there is one).
    plain = models.build_model("area_teacher", num_classes=4)
    model = plain.clone(area_query_chunk_size=chunk)
    fn = export.inference_function(model, _variables(plain, real_windows))
    x = real_windows[:2, ..., None]
    assert "cumsum" in _nested_calls(jax.make_jaxpr(fn)(x).jaxpr)  # what the converter would see
    inlined = export._inline_nested_jits(fn)
    assert _nested_calls(jax.make_jaxpr(inlined)(x).jaxpr) == []
    np.testing.assert_array_equal(np.asarray(jax.jit(inlined)(x)), np.asarray(jax.jit(fn)(x)))


@pytest.fixture(scope="module")
def run_dir(tiny_prep_dir, tmp_path_factory):
    return helpers_export.tiny_run(tiny_prep_dir, tmp_path_factory)


def test_export_run_writes_a_self_contained_folder(run_dir, tiny_prep_dir, tmp_path):
    out = tmp_path / "export"
    card = export.export_run(run_dir, out)
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.onnx", "model.stablehlo"]
    assert json.loads((out / "model.json").read_text()) == card
    meta = records.load_metadata(tiny_prep_dir)
    assert card["label_names"] == meta["label_names"]
    fc = {**meta["feature_config"], "short_utterances": "pad"}
    assert {k: card["features"][k] for k in fc} == fc
    assert card["features"]["frames_per_window"] == 63 and card["features"]["num_bins"] == 26
    f = card["features"]
    assert (f["mfcc_amin"], f["mfcc_top_db"], f["front_end"]) == (1e-10, 80.0, 2)
    norm = json.loads((run_dir / "normalization.json").read_text())
    assert card["normalization"] == {"mode": "global", "mean": norm["mean"], "std": norm["std"]}
    run = run_dir_lib.restore_run(run_dir)
    noise = np.random.default_rng(0).standard_normal((8, 26, 63, 1)).astype(np.float32)
    assert card["export_check"]["inputs"] == "8 windows of N(0, 1) noise (seed 0)"
    ref = np.asarray(_forward(run.model)(run.variables, noise))
    assert card["export_check"]["max_abs_logit"] == pytest.approx(np.abs(ref).max(), rel=1e-6)
    tol = TINY_REL * _final_layer_scale(run.model, run.variables, noise)
    src = card["source"]
    assert src["step"] == run.step and src["checkpoint"] == "latest"
    assert src["training_finished"] is True  # False for an export of a partly trained run
    digest = hashlib.sha256((run_dir / "config.json").read_bytes()).hexdigest()
    assert src["config_hash"] == "sha256:" + digest
    assert src["data_content_hash"] == meta["content_hash"]
    res = json.loads((run_dir / run_dir_lib.RESULTS_FILE).read_text())
    assert card["test"]["wa"] == res["wa"] and card["test"]["ua"] == res["ua"]
    assert card["test"]["same_checkpoint"] is True
    assert card["model"]["num_parameters"] == models.count_parameters(run.variables["params"])
    assert card["model"]["input"]["shape"] == ["batch", 26, 63, 1]
    for fmt in ("onnx", "stablehlo"):
        path = out / card["files"][fmt]["path"]
        assert card["files"][fmt]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert card["export_check"]["max_abs_logit_difference"][fmt] <= tol
    props = {p.key: p.value for p in onnx.load(out / "model.onnx").metadata_props}
    assert json.loads(props["label_names"]) == meta["label_names"]
    # the trained run's ONNX logits equal its Flax logits on real (normalised) windows
    x = records.load_split(tiny_prep_dir, "eval").features[:40]
    x = ((x - np.array(norm["mean"])[:, None]) / np.array(norm["std"])[:, None]).astype(np.float32)
    ref = np.asarray(_forward(run.model)(run.variables, x[..., None]))
    got = export.onnx_logits(out / "model.onnx", x[..., None])
    tol = TINY_REL * _final_layer_scale(run.model, run.variables, x[..., None])
    np.testing.assert_allclose(got, ref, rtol=0, atol=tol)


def test_normalization_card_per_utterance_and_none():
    card = export._normalization_card({"mode": "speaker", "groups": {"s1": {}}}, 26)
    assert card["mode"] == "utterance" and card["trained_with"] == "speaker"
    assert "groups" not in card  # training speakers' statistics are not shipped
    assert export._normalization_card({"mode": "none"}, 26) == {"mode": "none"}
    with pytest.raises(export.ExportError, match="2 bands"):
        export._normalization_card({"mode": "global", "mean": [0, 1], "std": [1, 1]}, 26)


def _one_error_line(capsys, rc):
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("python -m dkd_jax.export: error: ")
    return err


def test_cli_exports_and_refuses_bad_requests(run_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cli"
    argv = ["--workdir", str(run_dir), "--out", str(out), "--format", "stablehlo"]
    assert export.main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.stablehlo"]
    assert "holds an earlier export (pass --overwrite" in _one_error_line(capsys, export.main(argv))
    (out / "model.onnx").write_bytes(b"stale")  # --overwrite leaves no stale file behind
    assert export.main([*argv, "--overwrite"]) == 0
    capsys.readouterr()
    assert not (out / "model.onnx").exists()
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full_disk(fn, shape, path):
        Path(path).write_bytes(b"half")
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(export, "to_stablehlo", full_disk)  # was: the earlier export deleted
    err = _one_error_line(capsys, export.main([*argv, "--overwrite"]))
    assert err.endswith(f"{export.STAGE_DIR}/model.stablehlo: No space left on device")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched, no stage left
    monkeypatch.undo()
    # A folder of other files is never written into, --overwrite or not; nor is a file.
    other = tmp_path / "corpus"
    other.mkdir()
    (other / "a.wav").write_bytes(b"RIFF")
    for extra in ([], ["--overwrite"]):
        err = _one_error_line(capsys, export.main([*argv[:2], "--out", str(other), *extra]))
        assert err.endswith(
            f"{other}: not empty and holds no earlier export (model.json "
            "missing); choose an empty or new folder"
        )
    assert [p.name for p in other.iterdir()] == ["a.wav"]
    err = _one_error_line(capsys, export.main([*argv[:2], "--out", str(other / "a.wav")]))
    assert err.endswith(f"{other / 'a.wav'}: exists and is not a folder")
    err = _one_error_line(capsys, export.main(["--workdir", str(tmp_path / "nope"), "--out", "x"]))
    assert "no such run directory" in err
    bad = ["--workdir", str(run_dir), "--out", str(tmp_path / "o2")]
    assert "step 999" in _one_error_line(capsys, export.main([*bad, "--step", "999"]))
    assert "--format" in _one_error_line(capsys, export.main([*bad, "--format", "tflite"]))
    assert "opset" in _one_error_line(capsys, export.main([*bad, "--opset", "13"]))
    err = _one_error_line(capsys, export.main([*bad, "--opset", "999"]))  # was: a traceback
    assert "--opset 999: this onnx" in err and "knows opsets up to" in err
    assert not (tmp_path / "o2").exists()


def test_missing_extra_is_a_one_line_error_naming_the_install(
    run_dir, tmp_path, monkeypatch, capsys
):
    import sys

    monkeypatch.setitem(sys.modules, "jax2onnx", None)  # import jax2onnx now raises ImportError
    rc = export.main(["--workdir", str(run_dir), "--out", str(tmp_path / "o")])
    err = _one_error_line(capsys, rc)
    assert "jax2onnx" in err and "pip install -e '.[export]'" in err
    assert "or export StableHLO only (--format stablehlo)" in err
    assert not (tmp_path / "o").exists()


def test_a_damaged_results_file_is_named_not_a_traceback(tmp_path):
    results = tmp_path / run_dir_lib.RESULTS_FILE
    assert export._test_scores(tmp_path, 3, False) is None  # not scored: the card says so
    for text, message in ((b"[1]", "not a JSON object"), (b"\xff", "not UTF-8")):
        results.write_bytes(text)
        with pytest.raises(export.ExportError, match=f"^{results}: {message}"):
            export._test_scores(tmp_path, 3, False)
    scored = {k: 0.5 for k in run_dir_lib.RESULT_KEYS} | {"step": 3, "split": "x"}
    results.write_text(json.dumps(scored))
    got = export._test_scores(tmp_path, 3, False)
    assert got["same_checkpoint"] is True and got["split"] is None and got["wa"] == 0.5


def test_the_card_carries_test_scores_of_the_exported_model_only(tmp_path):
    """An audit: an export of step 4 carried step 8's WA/UA (``same_checkpoint`` false beside
    them), and one after ``eval.py --aggregate probs`` the scores of averaged probabilities for
    a model whose rule is the mean of logits."""
    results = tmp_path / run_dir_lib.RESULTS_FILE
    scored = {k: 0.5 for k in run_dir_lib.RESULT_KEYS} | {"step": 8, "checkpoint": "latest"}
    logits = "mean of segment logits per utterance, then argmax"
    results.write_text(json.dumps(scored | {"aggregation": logits}))
    same = export._test_scores(tmp_path, 8, False)
    assert same["wa"] == 0.5 and same["same_checkpoint"] is True and "not_this_model" not in same
    for step, best, aggregation, why in (
        (4, False, logits, "results.json scored step 8, not this export's checkpoint"),
        (8, True, logits, "results.json scored step 8, not this export's checkpoint"),
        (8, False, "mean of segment probs per utterance, then argmax", "scored the mean of "
         "segment probs per utterance, then argmax; the export averages window logits"),
    ):  # fmt: skip
        results.write_text(json.dumps(scored | {"aggregation": aggregation}))
        got = export._test_scores(tmp_path, step, best)
        assert got["same_checkpoint"] is (step == 8 and not best) and why in got["not_this_model"]
        assert not {"wa", "ua", "num_utterances"} & set(got), got


def test_an_out_folder_holding_only_hidden_files_is_empty(tmp_path):
    """An audit: ``--out`` holding only a ``.gitkeep`` was "not empty and holds no earlier
    export" (train.py ignores hidden files in a workdir)."""
    out = tmp_path / "export"
    out.mkdir()
    (out / ".gitkeep").write_text("")
    export._check_out_dir(out, overwrite=False)  # no error
    (out / "notes.txt").write_text("")
    with pytest.raises(export.ExportError, match="not empty and holds no earlier export"):
        export._check_out_dir(out, overwrite=False)
