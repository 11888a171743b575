"""Test of dkd_jax.demo: every stage runs and prints, and a second run reuses everything.

The real demo (``python -m dkd_jax.demo``: "demo" corpus, "demo" preset, five folds) takes
minutes; here the same code path runs on the "tiny" corpus and preset with one fold.
"""

import json

import pytest

from dkd_jax import demo, experiment, run_dir


def test_demo_stages_and_resume(tmp_path, capsys):
    out = tmp_path / "demo"
    summary = demo.run_demo(out, folds=(0,), progress=False, corpus_size="tiny", preset="tiny")
    text = capsys.readouterr().out
    for stage in ("[1/4] synthetic", "[2/4] features: MFCC-26", "[3/4] loso protocol", "[4/4]"):
        assert stage in text
    assert "student DKD: UA" in text and "chance level" in text
    exp_dir = out / "experiment"
    assert f"summary table: {exp_dir / experiment.SUMMARY_MD}" in text
    assert (out / "corpus" / "Session1").is_dir()
    meta = json.loads((out / "prep" / "metadata.json").read_text())
    assert meta["feature_config"]["kind"] == "mfcc" and meta["segment_shape"] == [26, 63]
    assert set(summary["models"]) == {"teacher", "dkd", "ce", "baseline"}
    assert summary["baseline_verdict"] in text and "baseline (feature statistics): UA" in text
    for model in ("teacher", "student_dkd", "student_ce"):
        assert (exp_dir / "fold0-seed0" / model / run_dir.RESULTS_FILE).exists()
    assert (exp_dir / "confusion_dkd.png").exists()
    # The closing lines point at the distilled student's run, which exists.
    student = exp_dir / "fold0-seed0" / "student_dkd"
    assert f"python eval.py predict --workdir {student} a.wav" in text
    assert f"python -m dkd_jax.export --workdir {student} --out student_onnx" in text
    # Second run: corpus, prep and the finished fold are reused, nothing retrains.
    again = demo.run_demo(out, folds=(0,), progress=False, corpus_size="tiny", preset="tiny")
    text = capsys.readouterr().out
    assert text.count("finished earlier, skipped") == 3
    assert again["models"] == summary["models"]
    # A run left by an earlier version whose preset differed: refused, then retrained on request.
    cfg_path = exp_dir / "fold0-seed0" / "student_ce" / run_dir.CONFIG_FILE
    stored = json.loads(cfg_path.read_text())
    stored["train"]["eval_every_epochs"] = 2
    cfg_path.write_text(json.dumps(stored))
    with pytest.raises(experiment.ExperimentError, match="--overwrite to delete such runs"):
        demo.run_demo(out, folds=(0,), progress=False, corpus_size="tiny", preset="tiny")
    capsys.readouterr()
    third = demo.run_demo(
        out, folds=(0,), progress=False, corpus_size="tiny", preset="tiny", overwrite=True
    )
    assert capsys.readouterr().out.count("finished earlier, skipped") == 2
    assert third["models"] == summary["models"]


def test_demo_cli_error_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    for extra in ([], ["--overwrite"]):
        rc = demo.main(["--out", str(blocker), "--no-progress", *extra])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("demo: error: ") and len(err.strip().splitlines()) == 1


def test_demo_refuses_bad_folds_and_jobs_before_any_work(tmp_path, capsys):
    out = tmp_path / "demo"
    for folds, message in (("9", "the synthetic corpus has 5 sessions"), ("3-1", "reversed range")):
        assert demo.main(["--out", str(out), "--folds", folds, "--no-progress"]) == 2
        assert message in capsys.readouterr().err
    for jobs in ("0", "-2"):  # used to become 1 without a word
        with pytest.raises(SystemExit):
            demo.main(["--out", str(out), "--jobs", jobs])
        assert "--jobs" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # used to run fold 0 alone into experiment-quick/
        demo.main(["--out", str(out), "--quick", "--folds", "0"])
    assert "give --folds or --quick, not both" in capsys.readouterr().err
    assert not out.exists()  # nothing was generated
