"""Tests for dkd_jax.experiment: the runner end to end, resume, reproduce, summaries, CLI.

The end-to-end tests share one tiny experiment (tests/helpers_eval.py: 2 loso folds, teacher +
DKD student, "tiny" preset) trained once per session.
"""

import dataclasses
import errno
import json
import shutil

import helpers_eval
import helpers_permissions as deny
import jax
import numpy as np
import pytest

from dkd_jax import config as config_lib
from dkd_jax import eval_lib, experiment, protocols, records, run_dir
from dkd_jax.experiment import runner


@pytest.fixture(scope="module")
def exp(tiny_prep_dir, tmp_path_factory):
    return helpers_eval.shared_experiment(tiny_prep_dir, tmp_path_factory)


def _results(exp_dir, key):
    return json.loads((exp_dir / key / run_dir.RESULTS_FILE).read_text())


def _test_evals(exp_dir, key):
    lines = (exp_dir / key / "metrics.jsonl").read_text().splitlines()
    recs = [json.loads(line) for line in lines if line.strip()]
    return [r for r in recs if r.get("event") == "eval" and r.get("split") == "test"]


KEYS = [f"fold{f}-seed0/{m}" for f in (0, 1) for m in ("teacher", "student_dkd")]


def test_run_writes_every_run_and_summary(exp, tiny_prep_dir):
    exp_dir, summary, events = exp
    assert events == [(k, "trained") for k in KEYS]
    meta = records.load_metadata(tiny_prep_dir)
    for key in KEYS:
        res = _results(exp_dir, key)
        assert (exp_dir / key / run_dir.CONFUSION_FILE).stat().st_size > 1000
        cm = np.array(res["confusion_matrix"])
        assert cm.sum() == res["num_utterances"] == res["split"]["num_test_utterances"]
        assert res["wa"] == pytest.approx(np.trace(cm) / cm.sum(), abs=1e-12)
        assert res["data"]["content_hash"] == meta["content_hash"]
        assert res["config"]["data"]["normalization"] == "global"
        assert res["provenance"]["packages"]["jax"] and res["provenance"]["device"]["device_kind"]
        # The runner's evaluation equals train_lib's own last-epoch test evaluation.
        last = _test_evals(exp_dir, key)[-1]
        assert last["step"] == res["step"]
        assert last["confusion_matrix"] == res["confusion_matrix"]
        assert last["wa"] == res["wa"] and last["ua"] == res["ua"]
    # Held-out sessions: fold k holds out the k-th session, and the folds cover every utterance.
    splits = [_results(exp_dir, f"fold{f}-seed0/teacher")["split"]["name"] for f in (0, 1)]
    assert splits == ["loso-fold0-Session1", "loso-fold1-Session2"]
    total = sum(_results(exp_dir, f"fold{f}-seed0/teacher")["num_utterances"] for f in (0, 1))
    assert total == len(meta["utterances"])
    # Summary: mean and sample std per model, best-epoch column >= last epoch.
    assert set(summary["models"]) == {"teacher", *helpers_eval.STUDENTS, "baseline"}
    for model, name in (("teacher", "teacher"), ("dkd", "student_dkd")):
        wa = [_results(exp_dir, f"fold{f}-seed0/{name}")["wa"] for f in (0, 1)]
        stats = summary["models"][model]
        assert stats["runs"] == 2
        assert stats["wa"]["mean"] == pytest.approx(np.mean(wa), abs=1e-12)
        assert stats["wa"]["std"] == pytest.approx(np.std(wa, ddof=1), abs=1e-12)
    for row in (r for r in summary["runs"] if r["model"] != "baseline"):
        evals = _test_evals(exp_dir, row["workdir"])
        assert row["best_epoch_wa"] == max(e["wa"] for e in evals) >= row["wa"]
        assert row["best_epoch_ua"] == max(e["ua"] for e in evals) >= row["ua"]
    on_disk = json.loads((exp_dir / experiment.SUMMARY_JSON).read_text())
    assert on_disk["models"]["dkd"]["ua"] == summary["models"]["dkd"]["ua"]
    md = (exp_dir / experiment.SUMMARY_MD).read_text()
    assert "Optimistic" in md and "best epoch on test" in md
    per_run = md.split("## Per run")[1]
    assert per_run.count("| fold") == 6  # one row per run and per group's baseline
    assert md.split("## Speaker–label confound")[1].split("## Per run")[0].count("| fold") == 2
    text = experiment.format_summary_text(summary)
    assert "student DKD" in text and "teacher (CE)" in text and "optimistic" in text


def test_rerun_skips_finished_runs_and_resumes_missing_ones(exp, tiny_prep_dir):
    exp_dir, summary, _ = exp
    spec = helpers_eval.shared_spec(tiny_prep_dir)
    events = []
    again = experiment.run_experiment(
        exp_dir, spec, progress=False, quiet=True, on_run=lambda p, s: events.append((p.key, s))
    )
    assert events == [(k, "skipped") for k in KEYS]
    assert again["models"] == summary["models"]
    # A run whose results.json is gone is resumed (from its final checkpoint) and re-evaluated.
    key = "fold1-seed0/student_dkd"
    before = _results(exp_dir, key)
    (exp_dir / key / run_dir.RESULTS_FILE).unlink()
    events.clear()
    experiment.run_experiment(
        exp_dir, spec, progress=False, quiet=True, on_run=lambda p, s: events.append((p.key, s))
    )
    assert [k for k, s in events if s == "trained"] == [key]
    after = _results(exp_dir, key)
    for field in ("wa", "ua", "confusion_matrix", "step", "config"):
        assert after[field] == before[field]


def test_results_this_user_may_not_read_stop_the_runner_instead_of_being_redone(
    exp, tiny_prep_dir, tmp_path, monkeypatch
):
    """A run (or a baseline) whose results.json could not be read counted as not finished: the
    runner trained it again and replaced the file, summarize dropped the baseline, and
    reproduce reran the model and then reported MISMATCH."""
    from dkd_jax.experiment import runner

    exp_dir, summary, _ = exp
    copy = tmp_path / "exp"
    shutil.copytree(exp_dir, copy)
    spec = helpers_eval.shared_spec(tiny_prep_dir)
    trained = []
    monkeypatch.setattr(runner, "execute_run", lambda plan, *a, **k: trained.append(plan.key))
    for key in ("fold1-seed0/student_dkd", "fold0-seed0/baseline"):
        path = copy / key / run_dir.RESULTS_FILE
        with monkeypatch.context() as m:
            deny.deny_path_reads(m, path)
            with pytest.raises(PermissionError) as e:
                experiment.run_experiment(copy, spec, progress=False, quiet=True)
            assert e.value.filename == str(path) and trained == []
            with pytest.raises(PermissionError):
                experiment.write_summary(copy)
            if key.endswith("baseline"):
                continue
            with pytest.raises(PermissionError):  # before any rerun
                experiment.reproduce(
                    copy, fold=1, model="dkd", scratch=tmp_path / "r", progress=False, quiet=True
                )
            assert trained == [] and not (tmp_path / "r").exists()
    assert experiment.write_summary(copy)["models"] == summary["models"]  # readable again
    deny.deny_listdir(monkeypatch, copy / "fold1-seed0")
    with pytest.raises(PermissionError) as e:  # was: its runs left out of the summary
        experiment.write_summary(copy)
    assert e.value.filename == str(copy / "fold1-seed0")


def test_changed_settings_are_refused(exp, tiny_prep_dir):
    exp_dir, _, _ = exp
    spec = experiment.make_spec(
        data=tiny_prep_dir, protocol="loso", folds=(0,), preset="tiny", overrides=["kd.beta=2"]
    )
    with pytest.raises(experiment.ExperimentError, match="other settings"):
        experiment.run_experiment(exp_dir, spec, progress=False, quiet=True)


def test_a_run_trained_with_an_older_preset_is_refused_or_retrained(exp, tmp_path):
    # The recorded settings match but a run's config does not (a preset changed between
    # versions): one line naming the field and the experiment's own remedy, before any training.
    exp_dir = tmp_path / "copy"
    shutil.copytree(exp[0], exp_dir)
    spec = experiment.ExperimentSpec.from_dict(
        json.loads((exp_dir / experiment.EXPERIMENT_FILE).read_text())
    )
    key = "fold1-seed0/student_dkd"
    cfg_path = exp_dir / key / run_dir.CONFIG_FILE
    stored = json.loads(cfg_path.read_text())
    stored["train"]["eval_every_epochs"] = 2
    cfg_path.write_text(json.dumps(stored))
    before = _results(exp_dir, key)
    events = []
    with pytest.raises(experiment.ExperimentError) as err:
        experiment.run_experiment(
            exp_dir, spec, progress=False, quiet=True, on_run=lambda p, s: events.append(s)
        )
    msg = str(err.value)
    assert str(exp_dir / key) in msg and "train.eval_every_epochs: 2 -> 1" in msg
    assert "--overwrite" in msg and "--workdir" not in msg and len(msg.splitlines()) == 1
    assert events == []  # refused before any run is visited, so before training anything
    events.clear()
    experiment.run_experiment(
        exp_dir,
        spec,
        overwrite=True,
        progress=False,
        quiet=True,
        on_run=lambda p, s: events.append((p.key, s)),
    )
    assert [k for k, s in events if s == "trained"] == [key]
    after = _results(exp_dir, key)
    assert after["config"]["train"]["eval_every_epochs"] == 1
    for field in ("wa", "ua", "confusion_matrix", "step"):
        assert after[field] == before[field]  # retrained from scratch: the same run again


def test_is_finished_requires_same_config(exp, tiny_prep_dir):
    exp_dir, _, _ = exp
    spec = experiment.ExperimentSpec.from_dict(
        json.loads((exp_dir / experiment.EXPERIMENT_FILE).read_text())
    )
    plan = experiment.plan_runs(spec, exp_dir)[1]
    assert experiment.is_finished(exp_dir / plan.key, plan.config)
    plan.config.train.progress = not plan.config.train.progress  # volatile: still finished
    assert experiment.is_finished(exp_dir / plan.key, plan.config)
    plan.config.kd.beta = 3.0
    assert not experiment.is_finished(exp_dir / plan.key, plan.config)


# What may change while the suite runs: a commit or an edit in the checkout (git_commit() is
# read per run).
_CHECKOUT_CHANGES = ("uncommitted changes", "git commit")


def test_reproduce_reports_bit_for_bit_match(exp, tmp_path):
    exp_dir, _, _ = exp
    report = experiment.reproduce(
        exp_dir, fold=0, model="dkd", scratch=tmp_path / "rep", progress=False, quiet=True
    )
    assert list(report["runs"]) == ["fold0-seed0/student_dkd"]
    run = report["runs"]["fold0-seed0/student_dkd"]
    environment = run.pop("environment")  # the same machine and software (the checkout aside)
    assert not [e for e in environment if not e.startswith(_CHECKOUT_CHANGES)], environment
    assert run == {
        "match": True,
        "results": True,
        "metrics": True,
        "params": True,
        "differences": [],
    }
    assert report["match"] is True
    assert json.loads((tmp_path / "rep" / "reproduce.json").read_text())["match"] is True
    # the rerun student distilled from the original teacher
    teacher = json.loads((tmp_path / "rep/fold0-seed0/student_dkd/teacher.json").read_text())
    assert teacher["workdir"] == str((exp_dir / "fold0-seed0/teacher").absolute())


def test_reproduce_never_deletes_a_folder_it_did_not_make(exp, tmp_path, capsys):
    from dkd_jax.experiment import runner

    exp_dir, _, _ = exp
    precious = tmp_path / "precious"
    (precious / "sub").mkdir(parents=True)
    (precious / "notes.txt").write_text("mine")
    rc = experiment.main(["reproduce", str(exp_dir), "--scratch", str(precious), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and f"--scratch {precious}: not empty (notes.txt, sub)" in err
    assert (precious / "notes.txt").read_text() == "mine"
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(experiment.ExperimentError, match="not a directory"):
        runner._empty_scratch(tmp_path / "a_file")
    # new, empty, marked and older (reproduce.json) folders are (re)made, marked
    older = tmp_path / "older"
    (older / "fold0-seed0").mkdir(parents=True)
    (older / "reproduce.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    new = tmp_path / "new" / "deep"
    for folder in (new, tmp_path / "empty", older):
        runner._empty_scratch(folder)
        assert [p.name for p in folder.iterdir()] == [runner.SCRATCH_MARKER]
    (new / "fold0-seed0").mkdir()  # a marked folder with reruns in it
    runner._empty_scratch(new)
    assert [p.name for p in new.iterdir()] == [runner.SCRATCH_MARKER]


@pytest.mark.parametrize(
    "text, message",
    [
        (b'{"data":', "not valid JSON"),
        (b"\xff{}", "not UTF-8 text (byte 0)"),
        (b"[]", "not a JSON object"),
        (b'{"bogus": 1}', "unknown field(s) bogus; missing field(s) data, protocol, folds, seeds"),
        (b'{"data": "d", "protocol": "loso", "folds": [0], "seeds": "0"}', "seeds must be a list"),
        (b'{"data": "d", "protocol": "loso", "folds": [true], "seeds": [0]}', "folds must be a"),
        (b'{"data": 1, "protocol": "loso", "folds": [0], "seeds": [0]}', "data must be str"),
    ],
)
def test_a_damaged_experiment_json_is_named_in_one_line(tmp_path, capsys, text, message):
    (tmp_path / experiment.EXPERIMENT_FILE).write_bytes(text)
    for argv in (["summarize", str(tmp_path)], ["reproduce", str(tmp_path)]):
        assert experiment.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"experiment: error: {tmp_path / experiment.EXPERIMENT_FILE}: ")
        assert message in err and len(err.strip().splitlines()) == 1
    with pytest.raises(experiment.ExperimentError, match="fix it, use another --out"):
        _load_or_write(tmp_path)


def test_summarize_refuses_a_damaged_results_file_instead_of_dropping_the_run(
    tiny_prep_dir, tmp_path, capsys
):
    spec = experiment.ExperimentSpec(
        data=str(tiny_prep_dir), protocol="loso", folds=(0,), seeds=(0,), preset="tiny"
    )
    (tmp_path / experiment.EXPERIMENT_FILE).write_text(json.dumps(spec.to_dict()))
    results = tmp_path / "fold0-seed0" / "teacher" / run_dir.RESULTS_FILE
    results.parent.mkdir(parents=True)
    for text, message in ((b'{"wa":', "not valid JSON"), (b'{"wa": 1}', "missing ua")):
        results.write_bytes(text)
        assert experiment.main(["summarize", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"experiment: error: {results}: {message}")
        assert not (tmp_path / experiment.SUMMARY_JSON).exists()  # nothing overwritten
    # Readable results of a partly trained model (eval.py on a killed run, or --step/--best):
    # refused too, naming the run (they used to be averaged into the summary).
    valid = {
        "wa": 0.5,
        "ua": 0.5,
        "num_utterances": 4,
        "confusion_matrix": [[2]],
        "label_names": ["a"],
    }
    for extra, message in (
        ({"training_finished": False}, "partly trained model"),
        ({"checkpoint": "best-by-validation"}, "the best-by-validation checkpoint, not the last"),
    ):
        results.write_text(json.dumps({**valid, **extra}))
        assert experiment.main(["summarize", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"experiment: error: {results.parent}: results.json scores ")
        assert message in err and "run the experiment command again" in err
        assert not (tmp_path / experiment.SUMMARY_JSON).exists()


def _load_or_write(exp_dir):
    from dkd_jax.experiment import runner

    spec = experiment.ExperimentSpec(data="d", protocol="loso", folds=(0,), seeds=(0,))
    runner._load_or_write_spec(exp_dir, spec, None, overwrite=False)


def test_compare_runs_detects_differences(exp, tmp_path):
    exp_dir, _, _ = exp
    cmp = experiment.compare_runs(exp_dir / "fold0-seed0/teacher", exp_dir / "fold1-seed0/teacher")
    assert cmp["match"] is False and cmp["params"] is False and cmp["metrics"] is False
    assert any(d.startswith("variables") for d in cmp["differences"])
    # one flipped bit in a copy's results is found
    copy = tmp_path / "copy"
    shutil.copytree(exp_dir / "fold0-seed0/teacher", copy)
    res = json.loads((copy / run_dir.RESULTS_FILE).read_text())
    res["ua"] = np.nextafter(res["ua"], 2.0)
    (copy / run_dir.RESULTS_FILE).write_text(json.dumps(res))
    cmp = experiment.compare_runs(exp_dir / "fold0-seed0/teacher", copy)
    assert cmp["params"] and cmp["metrics"] and not cmp["results"] and not cmp["match"]
    assert not [e for e in cmp["environment"] if not e.startswith(_CHECKOUT_CHANGES)]
    # the environment is compared too, and named: it explains a mismatch, it is not one
    res["ua"] = json.loads((exp_dir / "fold0-seed0/teacher" / run_dir.RESULTS_FILE).read_text())[
        "ua"
    ]
    cpu = res["provenance"]["device"]["cpu"]
    res["provenance"]["device"]["cpu"] = "Other CPU (avx avx2 fma)"
    res["provenance"]["packages"]["jax"] = "0.0.1"
    (copy / run_dir.RESULTS_FILE).write_text(json.dumps(res))
    cmp = experiment.compare_runs(copy, exp_dir / "fold0-seed0/teacher")
    assert cmp["match"] is True
    assert f"CPU Other CPU (avx avx2 fma) -> {cpu}" in cmp["environment"]
    assert f"jax 0.0.1 -> {jax.__version__}" in cmp["environment"]
    note = runner._environment_note(cmp["environment"])
    assert "trained in another environment" in note and "one CPU model, not across" in note
    del res["provenance"]["device"]["cpu"]  # a run of an older dkd-jax
    (copy / run_dir.RESULTS_FILE).write_text(json.dumps(res))
    env = experiment.compare_runs(copy, exp_dir / "fold0-seed0/teacher")["environment"]
    assert f"CPU not recorded then (an older dkd-jax), now {cpu}" in env
    assert "nondeterminism" in runner._environment_note([])


def test_make_spec_defaults_and_errors(tiny_prep_dir):
    paper = experiment.make_spec(data=tiny_prep_dir, protocol="paper")
    assert paper.seeds == (111111, 123456, 0, 999999, 987654) and paper.folds == ()
    loso = experiment.make_spec(data=tiny_prep_dir, protocol="loso", preset="tiny")
    assert loso.folds == (0, 1) and loso.seeds == (0,)
    plans = experiment.plan_runs(paper, "/x")
    assert [p.group for p in plans[::2]] == [f"seed{s}" for s in paper.seeds]
    assert all(p.config.data.split_seed == p.seed == p.config.train.seed for p in plans)
    assert [p.model for p in plans[:2]] == ["teacher", "dkd"]
    assert plans[0].config.model.role == "teacher" and plans[1].config.kd.loss == "dkd"
    with pytest.raises(experiment.ExperimentError, match="2 sessions"):
        experiment.make_spec(data=tiny_prep_dir, protocol="loso", folds=(2,))
    with pytest.raises(experiment.ExperimentError, match=r"runner sets data\.fold"):
        experiment.make_spec(data=tiny_prep_dir, protocol="loso", overrides=["data.fold=1"])
    for item in ("--config.config.data.fold=1", "config.config.kd.beta=2"):  # two prefixes
        with pytest.raises(experiment.ExperimentError, match=r"write it as --config\.group\.field"):
            experiment.make_spec(data=tiny_prep_dir, protocol="loso", overrides=[item])
    with pytest.raises(experiment.ExperimentError, match=r"compilation cache in EXP/\.jax_cache"):
        experiment.make_spec(
            data=tiny_prep_dir, protocol="loso", overrides=["train.compilation_cache_dir=/c"]
        )
    for students in (("dkd", "xx"), ()):  # () is what --students "" gives
        with pytest.raises(experiment.ExperimentError, match="bad --students"):
            experiment.make_spec(data=tiny_prep_dir, protocol="loso", students=students)
    with pytest.raises(experiment.ExperimentError, match="unknown"):
        experiment.make_spec(data=tiny_prep_dir, protocol="loso", overrides=["kd.nope=1"])
    with pytest.raises(experiment.ExperimentError, match="--folds applies to loso"):
        experiment.make_spec(data=tiny_prep_dir, protocol="paper", folds=(0,))
    assert experiment.cli.parse_ints("0-2,5", "--folds") == (0, 1, 2, 5)
    spec = experiment.make_spec(
        data=tiny_prep_dir, protocol="loso", overrides=["--config.kd.beta=2", "config.kd.alpha=0"]
    )
    assert spec.overrides == ("kd.beta=2", "kd.alpha=0")  # one canonical form


def test_make_spec_validates_each_models_config_and_the_seeds(tiny_prep_dir, tmp_path):
    def spec(**kw):
        return experiment.make_spec(data=tiny_prep_dir, protocol="loso", preset="tiny", **kw)

    # Before: a misspelt teacher preset passed make_spec; the runner wrote experiment.json and
    # a group folder, failed in models.build_model, and the corrected command was then refused
    # as "other settings" until --overwrite.
    exp_dir = tmp_path / "x"
    with pytest.raises(experiment.ExperimentError, match=r"model\.teacher\.preset must be one of"):
        experiment.run_experiment(
            exp_dir, spec(overrides=["model.teacher.preset=area_teachr"]), progress=False
        )
    assert not exp_dir.exists()
    zero = ["kd.ce_weight=0", "kd.alpha=0", "kd.beta=0"]
    with pytest.raises(experiment.ExperimentError, match=r"kd\.loss='dkd' has every weight at 0"):
        spec(overrides=zero)
    assert spec(overrides=zero, students=("kd",)).students == ("kd",)  # kd uses kd_weight
    plans = experiment.plan_runs(spec(overrides=zero, students=("kd",)), tmp_path / "p")
    assert [p.config.kd.loss for p in plans[1::2]] == ["kd", "kd"]  # the runner plans it too
    with pytest.raises(experiment.ExperimentError, match=r"kd.loss='kd' has every weight"):
        spec(overrides=[*zero, "kd.kd_weight=0"], students=("kd",))
    with pytest.raises(
        experiment.ExperimentError, match=r"seeds must be integers in \[0, 2\*\*32\)"
    ):
        spec(seeds=(99999999999,))  # was: accepted, then experiment.json broke summarize
    assert spec(seeds=(2**32 - 1,)).seeds == (2**32 - 1,)


def test_teacher_preset_and_overrides_reach_the_configs(tiny_prep_dir):
    spec = experiment.make_spec(
        data=tiny_prep_dir,
        protocol="loso",
        folds=(1,),
        seeds=(3, 4),
        preset="tiny",
        teacher_preset="demo",
        students=("ce", "nckd"),
        overrides=["kd.beta=2.5"],
    )
    plans = experiment.plan_runs(spec, "/x")
    assert [p.key for p in plans] == [
        f"fold1-seed{s}/{m}" for s in (3, 4) for m in ("teacher", "student_ce", "student_nckd")
    ]
    teacher, ce = plans[0].config, plans[1].config
    demo, tiny = config_lib.get_config("demo"), config_lib.get_config("tiny")
    assert demo.optim.num_epochs != tiny.optim.num_epochs
    assert teacher.optim.num_epochs == demo.optim.num_epochs  # --teacher-preset demo
    assert ce.optim.num_epochs == tiny.optim.num_epochs  # --preset tiny
    assert teacher.kd.beta == ce.kd.beta == 2.5
    assert ce.kd.loss == "ce" and plans[2].config.kd.loss == "nckd"
    assert all(p.config.data.fold == 1 for p in plans)
    assert [p.config.train.seed for p in plans] == [3, 3, 3, 4, 4, 4]


def test_best_epoch_scores_takes_independent_maxima(tmp_path):
    recs = [
        {"event": "train", "step": 1, "loss": 1.0},
        {"event": "eval", "split": "test", "step": 2, "wa": 0.5, "ua": 0.6},
        {"event": "eval", "split": "validation", "step": 2, "wa": 0.99, "ua": 0.99},
        {"event": "eval", "split": "test", "step": 4, "wa": 0.7, "ua": 0.4},
        {"event": "eval", "split": "test", "step": 6, "wa": 0.6, "ua": 0.5},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + "{cut")
    best = experiment.best_epoch_scores(tmp_path)
    assert best == {"best_wa": 0.7, "best_ua": 0.6, "num_evals": 3}
    assert experiment.best_epoch_scores(tmp_path / "missing")["best_wa"] is None


def test_summary_statistics_single_run_has_no_std():
    rows = [
        {"model": "dkd", "wa": 0.5, "ua": 0.4, "best_epoch_wa": 0.6, "best_epoch_ua": None},
    ]
    s = experiment.summarize_rows(rows, ["teacher", "dkd"])
    assert list(s) == ["dkd"]
    assert s["dkd"]["wa"] == {"mean": 0.5, "std": None, "n": 1}
    assert s["dkd"]["best_epoch_ua"] == {"mean": None, "std": None, "n": 0}
    assert experiment.report._fmt(s["dkd"]["wa"]) == "50.0"
    assert experiment.report._fmt(s["dkd"]["ua"]) == "40.0"


def test_cli_summarize_and_errors(exp, capsys, tmp_path, tiny_prep_dir):
    exp_dir, _, _ = exp
    # the same experiment through the command line: everything is finished, nothing retrains
    argv = ["run", "--data", str(tiny_prep_dir), "--out", str(exp_dir), "--folds", "0-1"]
    argv += ["--preset", "tiny", "--students", ",".join(helpers_eval.STUDENTS), "--no-progress"]
    argv += [f"--config.{o}" for o in helpers_eval.EXP_OVERRIDES]
    assert experiment.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("finished earlier, skipped") == 4 and "teacher (CE)" in out
    assert experiment.main(["summarize", str(exp_dir)]) == 0
    out = capsys.readouterr().out
    assert "student DKD" in out and "mean ± std" in out
    rc = experiment.main(["run", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("experiment: error: ") and len(err.strip().splitlines()) == 1
    rc = experiment.main(["reproduce", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "not an experiment directory" in err
    (tmp_path / "a_file").write_text("")
    argv = ["run", "--data", str(tiny_prep_dir), "--out", str(tmp_path / "a_file")]
    assert experiment.main([*argv, "--preset", "tiny", "--folds", "0", "--no-baseline"]) == 2
    assert "--out " + str(tmp_path / "a_file") + ": a file" in capsys.readouterr().err


def test_validation_scores_reads_only_the_last_validation_eval(tmp_path):
    recs = [
        {"event": "eval", "split": "validation", "step": 2, "wa": 0.2, "ua": 0.25},
        {"event": "eval", "split": "test", "step": 4, "wa": 0.9, "ua": 0.9},
        {"event": "eval", "split": "validation", "step": 4, "wa": 0.5, "ua": 0.4},
        {"event": "eval", "split": "test", "step": 6, "wa": 0.8, "ua": 0.8},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + "{cut")
    assert experiment.validation_scores(tmp_path) == {"val_wa": 0.5, "val_ua": 0.4}
    assert experiment.validation_scores(tmp_path / "missing") == {"val_wa": None, "val_ua": None}


def test_validation_only_run_shows_no_test_scores(tiny_prep_dir, tmp_path, capsys):
    out_dir = tmp_path / "inner_cv"
    base = ["--data", str(tiny_prep_dir), "--out", str(out_dir), "--folds", "0"]
    base += ["--preset", "tiny", "--students", "ce", "--no-progress"]
    # Without a validation hold-out there is nothing to choose on: refused before any training.
    assert experiment.main(["run", *base, "--validation-only"]) == 2
    err = capsys.readouterr().err
    assert "--config.data.validation=speaker" in err and not out_dir.exists()
    argv = ["run", *base, "--validation-only", "--config.data.validation=speaker"]
    argv += ["--config.data.validation_fraction=0.5"]
    assert experiment.main(argv) == 0
    out = capsys.readouterr().out
    assert "VALIDATION" in out and "test utterances" not in out and "best-epoch" not in out
    assert out.count(": validation WA") == 3  # teacher, CE student, the baseline
    assert "fold0-seed0/baseline: validation WA" in out and "test WA" not in out
    assert not (out_dir / "fold0-seed0/baseline/results.json").exists()  # never scored on test
    assert (out_dir / "fold0-seed0/baseline/validation.json").exists()
    assert not (out_dir / experiment.SUMMARY_JSON).exists()
    rows = experiment.build_summary(out_dir)["runs"]
    for row in (r for r in rows if r["model"] != "baseline"):
        val = experiment.validation_scores(out_dir / row["workdir"])
        assert row["val_ua"] == val["val_ua"] is not None
        assert f"{row['workdir']} {100 * val['val_ua']:.1f}" in out
    assert experiment.main(["summarize", str(out_dir), "--validation-only"]) == 0
    out = capsys.readouterr().out
    assert "VALIDATION" in out and "best-epoch" not in out
    assert not (out_dir / experiment.SUMMARY_JSON).exists()
    # Once the choice is made, the ordinary summary reports test and validation scores.
    assert experiment.main(["summarize", str(out_dir)]) == 0
    md = (out_dir / experiment.SUMMARY_MD).read_text()
    assert "validation UA" in md and "val UA" in capsys.readouterr().out


def test_summarize_validation_only_needs_a_validation_hold_out(exp, capsys):
    exp_dir, _, _ = exp
    assert experiment.main(["summarize", str(exp_dir), "--validation-only"]) == 2
    assert "no finished run has a validation hold-out" in capsys.readouterr().err


def test_summary_covers_finished_runs_of_earlier_invocations(exp, tiny_prep_dir, tmp_path):
    # An experiment extended with another student for one fold (e.g. TCKD/NCKD for one seed next
    # to a full DKD grid) summarises every finished run, not only the last invocation's.
    exp_dir, summary, _ = exp
    copy = tmp_path / "extended"
    shutil.copytree(exp_dir, copy)
    spec = experiment.make_spec(
        data=tiny_prep_dir,
        protocol="loso",
        folds=(0,),
        preset="tiny",
        students=("ce",),
        overrides=helpers_eval.EXP_OVERRIDES,
    )
    events = []
    out = experiment.run_experiment(
        copy, spec, progress=False, quiet=True, on_run=lambda p, s: events.append((p.key, s))
    )
    assert events == [("fold0-seed0/teacher", "skipped"), ("fold0-seed0/student_ce", "trained")]
    assert list(out["models"]) == ["teacher", "ce", "dkd", "baseline"]
    assert [out["models"][m]["runs"] for m in ("teacher", "ce", "dkd")] == [2, 1, 2]
    assert out["models"]["dkd"]["ua"] == summary["models"]["dkd"]["ua"]
    assert out["num_finished_runs"] == out["num_planned_runs"] == 5
    assert out["experiment"]["folds"] == [0, 1] and out["experiment"]["students"] == ["ce", "dkd"]
    assert "folds [0, 1]" in experiment.format_summary_text(out)
    again = experiment.write_summary(copy)  # the `summarize` command: same coverage
    assert again["models"].keys() == out["models"].keys() and again["num_finished_runs"] == 5


def test_baseline_is_fitted_on_each_fold_and_summarised(exp, tiny_prep_dir):
    from dkd_jax import baseline, protocols

    exp_dir, summary, _ = exp
    meta = records.load_metadata(tiny_prep_dir)
    stats = baseline.utterance_statistics(tiny_prep_dir)
    cms = []
    for fold in (0, 1):
        cfg = run_dir.load_config(exp_dir / f"fold{fold}-seed0/teacher")
        split = protocols.split_for_run(meta, cfg.data)
        direct = baseline.fit_baseline(stats, split.train_ids, split.test_ids)
        stored = json.loads((exp_dir / f"fold{fold}-seed0/baseline/results.json").read_text())
        assert stored["confusion_matrix"] == direct["confusion_matrix"]
        assert (stored["wa"], stored["ua"], stored["C"]) == (
            direct["wa"],
            direct["ua"],
            direct["C"],
        )
        assert len(stored["predictions"]) == len(split.test_ids)
        cms.append(np.array(direct["confusion_matrix"]))
    stats_row = summary["models"]["baseline"]
    assert stats_row["runs"] == 2 and stats_row["best_epoch_wa"]["mean"] is None
    pooled = sum(cms)
    assert stats_row["pooled_confusion_matrix"] == pooled.tolist()
    assert stats_row["pooled_wa"] == pytest.approx(np.trace(pooled) / pooled.sum(), abs=1e-12)
    recall = np.diag(pooled) / pooled.sum(axis=1)
    assert stats_row["pooled_ua"] == pytest.approx(recall[pooled.sum(axis=1) > 0].mean())
    # The plain verdict: does any deep model beat the baseline (mean UA)?
    deep = max(summary["models"][m]["ua"]["mean"] for m in ("teacher", "dkd"))
    verdict = summary["baseline_verdict"]
    if deep <= stats_row["ua"]["mean"]:
        assert verdict.startswith("No deep model beats the feature-statistics baseline")
    else:
        assert verdict.startswith("The best deep model")
    assert verdict in experiment.format_summary_text(summary)
    assert verdict in (exp_dir / experiment.SUMMARY_MD).read_text()
    assert set(summary["confound"]) == {"fold0-seed0", "fold1-seed0"}
    norm = run_dir.load_config(exp_dir / "fold0-seed0/teacher").data.normalization
    assert summary["normalization"] == norm and summary["num_classes"] == len(meta["label_names"])
    if norm != "utterance":
        assert "normalization=utterance" not in experiment.format_summary_text(summary)


def test_utterance_normalisation_note_gives_the_baselines_score_against_chance():
    from dkd_jax.experiment import report

    def stat(mean):
        return {"mean": mean, "std": None}

    summary = {
        "experiment": {"protocol": "paper", "seeds": [0]},
        "num_finished_runs": 1,
        "num_planned_runs": 1,
        "models": {
            "baseline": {"label": "baseline", "runs": 1, "ua": stat(0.4625), "val_ua": stat(0.5)},
        },
        "runs": [],
        "normalization": "utterance",
        "num_classes": 4,
    }
    note = report.utterance_normalization_note(summary)
    assert "exactly the baseline's features, which alone reach UA 46.2 % (chance 25.0 %)" in note
    val = report.utterance_normalization_note(summary, key="val_ua")
    assert "validation UA 50.0 % (chance 25.0 %)" in val
    assert report.utterance_normalization_note({**summary, "num_classes": None}).count("(") == 0
    for other in ("none", "global", "speaker", None):
        assert report.utterance_normalization_note({**summary, "normalization": other}) is None
    no_base = {**summary, "models": {}}
    assert report.utterance_normalization_note(no_base) is None
    assert note in report._notes(summary, validation_only=False)
    assert val in report._notes(summary, validation_only=True)


def test_no_baseline_progress_lines_and_heartbeat(exp, tiny_prep_dir, tmp_path, capsys):
    exp_dir, _, _ = exp
    copy = tmp_path / "copy"
    shutil.copytree(exp_dir, copy)
    for fold in (0, 1):
        shutil.rmtree(copy / f"fold{fold}-seed0" / "baseline")
    # The first run is redone (results.json gone: resumed from its final checkpoint).
    (copy / "fold0-seed0/teacher" / run_dir.RESULTS_FILE).unlink()
    spec = helpers_eval.shared_spec(tiny_prep_dir)
    out = experiment.run_experiment(copy, spec, baselines=False, heartbeat_seconds=0.001)
    text, err = capsys.readouterr()
    assert "on its test set" not in err  # the runner's summary says it once, not each run
    for r in out["runs"]:  # each row carries the note that summary gives
        res = json.loads((copy / r["workdir"] / run_dir.RESULTS_FILE).read_text())
        assert r["collapse"] == eval_lib.collapse_note(res["confusion_matrix"], res["label_names"])
    assert "baseline" not in out["models"] and not (copy / "fold0-seed0" / "baseline").exists()
    lines = [ln for ln in text.splitlines() if ln.strip().startswith("fold")]
    first = next(ln for ln in lines if ln.strip().startswith("fold0-seed0/teacher: WA"))
    # Only that run was left: the 3 finished ones are skipped, not counted (they used to be,
    # "3 run(s) left" with an ETA for runs that never trained).
    assert "elapsed" in first and "run(s) left" not in first
    assert any("finished earlier, skipped" in ln and "elapsed" in ln for ln in lines)
    assert "... fold0-seed0/teacher:" in text  # heartbeat lines during the run


def test_heartbeat_lines_say_where_the_run_is():
    import io
    import time

    from dkd_jax import train_loop

    stream = io.StringIO()
    with train_loop.Heartbeat("fold0/teacher", 0.02, stream=stream) as beat:
        time.sleep(0.1)
        beat.total_steps, beat.num_epochs = 120, 6
        beat.update(epoch=2, step=37, loss=1.25)
        time.sleep(0.1)
    lines = stream.getvalue().splitlines()
    assert "fold0/teacher: preparing (data, compilation)" in lines[0]
    assert "fold0/teacher: epoch 2/6, step 37/120, running loss 1.2500" in lines[-1]


def test_missing_classes_are_flagged_and_pooled_numbers_count_each_utterance():
    names = ["neutral", "happy", "sad", "angry"]

    def row(group, cm, absent=()):
        cm = np.asarray(cm)
        recall = np.diag(cm) / np.maximum(cm.sum(axis=1), 1)
        present = cm.sum(axis=1) > 0
        return {
            "group": group,
            "model": "dkd",
            "split": group,
            "wa": float(np.trace(cm) / cm.sum()),
            "ua": float(recall[present].mean()),
            "best_epoch_wa": None,
            "best_epoch_ua": None,
            "num_test_utterances": int(cm.sum()),
            "absent_classes": list(absent),
            "confusion_matrix": cm.tolist(),
            "label_names": names,
            "workdir": f"{group}/student_dkd",
        }

    full = [[5, 0, 0, 0], [0, 4, 1, 0], [0, 0, 3, 2], [0, 1, 0, 4]]
    no_sad = [[2, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 3]]
    rows = [row("fold0-seed0", full), row("fold1-seed0", no_sad, ["sad"])]
    stats = experiment.summarize_rows(rows, ["dkd"])["dkd"]
    pooled = np.add(full, no_sad)
    assert stats["pooled_wa"] == pytest.approx(np.trace(pooled) / pooled.sum())
    assert stats["pooled_ua"] == pytest.approx(np.mean(np.diag(pooled) / pooled.sum(axis=1)))
    assert stats["runs_missing_classes"] == 1
    summary = {
        "experiment": {"protocol": "loso", "folds": [0, 1], "seeds": [0]},
        "num_finished_runs": 2,
        "num_planned_runs": 2,
        "models": {"dkd": stats},
        "runs": rows,
    }
    text = experiment.format_summary_text(summary)
    assert "1 fold/seed group(s) have a test set that lacks a class" in text
    assert "fold1-seed0 (no sad)" in text
    baseline = {**rows[1], "model": "baseline"}  # counted by group, never by run (an audit:
    text = experiment.format_summary_text({**summary, "runs": [*rows, baseline]})
    assert "1 fold/seed group(s) have a test set" in text  # "2 run(s)" beside "2 runs finished")
    assert "trained on no utterance" not in text
    rows[0]["untrained_classes"] = ["angry"]  # a class of the held-out session only
    text = experiment.format_summary_text(summary)
    assert (
        "1 fold/seed group(s) trained on no utterance of a class, so they never predict it and UA "
        "counts its recall as 0 wherever it is tested: fold0-seed0 (no angry)."
    ) in text
    assert f"{100 * stats['pooled_wa']:.1f} / {100 * stats['pooled_ua']:.1f}" in text


def test_speaker_normalisation_warns_loudly_on_a_speaker_confounded_corpus(tiny_prep_dir, capsys):
    from dkd_jax.experiment import checks

    meta = records.load_metadata(tiny_prep_dir)
    confounded = json.loads(json.dumps(meta))
    for u in confounded["utterances"]:  # every speaker shows one emotion only
        u["label"] = sum(map(ord, u["speaker"])) % 4
    spec = experiment.make_spec(data=tiny_prep_dir, protocol="loso", preset="tiny", folds=(0,))
    plan = experiment.plan_runs(spec, "unused")[0]
    for norm, warned in (("speaker", True), ("global", False)):
        plan.config.data.normalization = norm
        numbers = checks.group_confound(plan, confounded)
        assert numbers["strength"] == "strong" and numbers["single_class_share"] == 1.0
        checks.warn_confound(plan, numbers)
        err = capsys.readouterr().err
        loud = "WARNING: normalization=speaker on a corpus where the speaker predicts"
        assert ("fold0-seed0, training speakers" in err and loud in err) == warned


def test_a_group_that_trains_without_a_class_is_warned_once(tiny_prep_dir, tmp_path, capsys):
    from dkd_jax.experiment import runner

    meta = json.loads(json.dumps(records.load_metadata(tiny_prep_dir)))
    spec = experiment.make_spec(data=tiny_prep_dir, protocol="loso", preset="tiny", folds=(0,))
    plan = experiment.plan_runs(spec, "unused")[0]
    held = protocols.split_for_run(meta, plan.config.data).test_ids
    for u in meta["utterances"]:  # angry only in the held-out session
        if u["label"] == 3 and u["utterance_id"] not in held:
            u["label"] = 0
    capsys.readouterr()
    runner._group_checks(
        tmp_path, plan, spec, meta, None, baselines=False, validation_only=False, quiet=True
    )
    err = capsys.readouterr().err.splitlines()
    assert [ln.split(" (", 1)[0] for ln in err if "trains on no utterance" in ln] == [
        "fold0-seed0: warning: loso-fold0-Session1 trains on no utterance of angry"
    ]


def test_held_out_speakers_with_one_emotion_get_a_note_under_speaker_normalisation(
    tiny_prep_dir,
):
    from dkd_jax.experiment import checks

    meta = json.loads(json.dumps(records.load_metadata(tiny_prep_dir)))
    spec = experiment.make_spec(data=tiny_prep_dir, protocol="loso", preset="tiny", folds=(0,))
    plan = experiment.plan_runs(spec, "unused")[0]
    plan.config.data.normalization = "speaker"
    assert checks.held_out_note(plan, meta) is None  # the tiny corpus: every speaker varies
    split = protocols.split_for_run(meta, plan.config.data)
    test = set(split.test_ids)
    held = sorted({u["speaker"] for u in meta["utterances"] if u["utterance_id"] in test})
    for u in meta["utterances"]:  # one held-out speaker shows anger only
        if u["speaker"] == held[0]:
            u["label"] = 3
    note = checks.held_out_note(plan, meta)
    assert note.startswith(
        f"note: 1 of {len(held)} held-out speakers show one emotion only: {held[0]} (angry); "
    )
    plan.config.data.normalization = "global"
    assert checks.held_out_note(plan, meta) is None
    spec = experiment.make_spec(data=tiny_prep_dir, protocol="paper", preset="tiny", seeds=(0,))
    paper = experiment.plan_runs(spec, "unused")[0]  # test speakers also train: their
    paper.config.data.normalization = "speaker"  # statistics come from training
    assert checks.held_out_note(paper, meta) is None


def test_concurrent_groups_give_bit_identical_runs(exp, tiny_prep_dir, tmp_path):
    """--jobs 2: the two folds train on two threads at once, and every run equals the one
    trained one at a time (results, per-utterance scores, metrics.jsonl, parameters)."""
    exp_dir, summary, _ = exp
    spec = helpers_eval.shared_spec(tiny_prep_dir)
    out = experiment.run_experiment(tmp_path / "jobs2", spec, progress=False, quiet=True, jobs=2)
    for key in KEYS:
        cmp = experiment.compare_runs(exp_dir / key, tmp_path / "jobs2" / key)
        assert cmp["match"], (key, cmp["differences"])
    assert out["models"]["dkd"]["ua"] == summary["models"]["dkd"]["ua"]
    assert (
        experiment.main(
            ["run", "--data", str(tiny_prep_dir), "--out", str(tmp_path / "x"), "--jobs", "0"]
        )
        == 2
    )


# ---------------------------------------------------------------- lifecycle (audit of the runner)


def _copy(exp, tmp_path, name="copy"):
    exp_dir, _, _ = exp
    copy = tmp_path / name
    shutil.copytree(exp_dir, copy, ignore=shutil.ignore_patterns("reproduce"))
    return copy


def test_reproduce_covers_the_runs_of_earlier_invocations(exp, tiny_prep_dir, tmp_path):
    # experiment.json records the last invocation (here: fold 0 only); fold 1 was trained by an
    # earlier one. summarize counts it, so reproduce must too (it said "all runs match"
    # without it, and refused --fold 1 as "no finished run").
    copy = _copy(exp, tmp_path)
    spec = dataclasses.replace(helpers_eval.shared_spec(tiny_prep_dir), folds=(0,))
    (copy / experiment.EXPERIMENT_FILE).write_text(json.dumps(spec.to_dict()))
    assert experiment.build_summary(copy)["num_finished_runs"] == 4
    report = experiment.reproduce(
        copy, fold=1, model="dkd", scratch=tmp_path / "s", progress=False, quiet=True
    )
    assert report["match"] and list(report["runs"]) == ["fold1-seed0/student_dkd"]


def test_the_same_settings_written_differently_are_the_same_experiment(
    exp, tiny_prep_dir, tmp_path
):
    from dkd_jax.experiment import runner

    exp_dir, _, _ = exp
    old = helpers_eval.shared_spec(tiny_prep_dir)
    meta = records.load_metadata(tiny_prep_dir)
    h = meta["content_hash"]
    same = [
        dataclasses.replace(old, teacher_preset="tiny"),  # the preset it already used
        dataclasses.replace(old, overrides=(*old.overrides, "optim.batch_size=8")),  # tiny's
        dataclasses.replace(old, overrides=("data.normalization=global",) * 2),
    ]
    for new in same:
        assert runner._spec_changes(exp_dir, old, new, h) == [], new
    moved = tmp_path / "moved_prep"  # the same prep elsewhere: same content hash
    shutil.copytree(tiny_prep_dir, moved)
    assert runner._spec_changes(exp_dir, old, dataclasses.replace(old, data=str(moved)), h) == []
    other = dataclasses.replace(old, data=str(moved))
    assert runner._spec_changes(exp_dir, old, other, "sha256:" + "0" * 64) == [
        f"data: {old.data!r} -> {str(moved)!r}"
    ]
    changed = dataclasses.replace(old, overrides=(*old.overrides, "optim.num_epochs=3"))
    assert runner._spec_changes(exp_dir, old, changed, h) == [
        "teacher: optim.num_epochs: 2 -> 3",
        "dkd: optim.num_epochs: 2 -> 3",
    ]


def test_runs_from_other_data_or_other_settings_are_not_summarised_with_the_others(
    exp, tiny_prep_dir, tmp_path
):
    spec = helpers_eval.shared_spec(tiny_prep_dir)

    def refused_by_run_and_summary(copy, match):
        for call in (
            lambda: experiment.run_experiment(copy, spec, progress=False, quiet=True),
            lambda: experiment.build_summary(copy),
        ):
            with pytest.raises(experiment.ExperimentError, match=match):
                call()

    # A prep rebuilt at the same path: the runs trained on the old content (they counted as
    # finished, and the summary showed the new hash next to them).
    copy = _copy(exp, tmp_path, "other_data")
    split_file = copy / "fold1-seed0" / "teacher" / run_dir.SPLIT_FILE
    split = json.loads(split_file.read_text())
    split["data"]["content_hash"] = "sha256:" + "0" * 64
    split["data"]["front_end"] = 1  # as if trained on a prep of the earlier front end
    split_file.write_text(json.dumps(split))
    refused_by_run_and_summary(copy, "trained on other data")
    refused_by_run_and_summary(copy, "front end version 1, this prep holds version 2")
    # A run trained with another batch size by an earlier invocation (a preset that changed
    # between versions): it was averaged in with the others without a word.
    copy = _copy(exp, tmp_path, "other_settings")
    config_file = copy / "fold1-seed0" / "teacher" / run_dir.CONFIG_FILE
    config = json.loads(config_file.read_text())
    config["optim"]["batch_size"] = 4
    config_file.write_text(json.dumps(config))
    spec0 = dataclasses.replace(spec, folds=(0,))
    with pytest.raises(experiment.ExperimentError, match=r"optim\.batch_size: 4 -> 8"):
        experiment.run_experiment(copy, spec0, progress=False, quiet=True)  # earlier run: fold 1
    with pytest.raises(experiment.ExperimentError, match="the summary would average it in"):
        experiment.build_summary(copy)
    # Another split of the same data and settings (a protocol rule changed since: the paper
    # protocol keeps improvised dialogs only now): neither skipped as finished nor averaged in.
    copy = _copy(exp, tmp_path, "other_split")
    split_file = copy / "fold1-seed0" / "student_dkd" / run_dir.SPLIT_FILE
    split = json.loads(split_file.read_text())
    moved = split["test_ids"].pop()
    split["train_ids"] = sorted([*split["train_ids"], moved])
    split_file.write_text(json.dumps(split))
    refused_by_run_and_summary(copy, "trained on another split")


def test_overwrite_does_not_delete_an_experiment_that_is_running(exp, tiny_prep_dir, tmp_path):
    copy = _copy(exp, tmp_path)
    spec = helpers_eval.shared_spec(tiny_prep_dir)
    other = dataclasses.replace(spec, overrides=(*spec.overrides, "optim.num_epochs=3"))
    busy = copy / "fold1-seed0" / "student_dkd"
    with helpers_eval.lock_held_elsewhere(busy, "the experiment runner") as pid:
        with pytest.raises(experiment.ExperimentError, match=f"in use by the experiment runner "
                           f"\\(pid {pid}"):  # fmt: skip
            experiment.run_experiment(copy, other, overwrite=True, progress=False, quiet=True)
        assert (copy / "fold0-seed0" / "teacher" / run_dir.RESULTS_FILE).exists()  # untouched
    # A runner holds the experiment folder for its whole invocation (between two runs, too).
    with helpers_eval.lock_held_elsewhere(copy, "the experiment runner") as pid:
        with pytest.raises(run_dir.WorkdirLockedError, match=f"pid {pid}"):
            experiment.run_experiment(copy, other, overwrite=True, progress=False, quiet=True)
        assert (copy / "fold0-seed0" / "teacher" / run_dir.RESULTS_FILE).exists()


def test_summary_files_are_written_whole_and_errors_name_them(exp, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    copy = _copy(exp, tmp_path)
    for png in copy.glob("confusion_*.png"):
        png.unlink()

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full_disk)
    with pytest.raises(OSError) as info:
        experiment.write_summary(copy)
    assert info.value.filename == str(copy / "confusion_teacher.png")  # named, not ""
    assert not list(copy.glob("*confusion_teacher.png*"))  # no empty plot left behind
    monkeypatch.undo()
    results = copy / "fold0-seed0" / "student_dkd" / run_dir.RESULTS_FILE
    results.write_text('{"wa": 0.5')
    with pytest.raises(experiment.ExperimentError, match="run the experiment again"):
        experiment.build_summary(copy)


def test_reproduce_takes_a_moved_prep_only_with_the_content_it_trained_on(
    exp, tiny_prep_dir, tmp_path, capsys
):
    copy = _copy(exp, tmp_path)
    spec = json.loads((copy / experiment.EXPERIMENT_FILE).read_text())
    spec["data"] = str(tmp_path / "gone")  # the prep moved since the experiment ran
    (copy / experiment.EXPERIMENT_FILE).write_text(json.dumps(spec))
    args = ["reproduce", str(copy), "--fold", "1", "--model", "dkd", "--no-progress"]
    assert experiment.main([*args, "--scratch", str(tmp_path / "s")]) == 2
    assert f"its prep dir {tmp_path / 'gone'} is not there (moved?); pass --data" in (
        capsys.readouterr().err
    )
    other = tmp_path / "other_prep"  # same layout, other content
    shutil.copytree(tiny_prep_dir, other)
    meta = json.loads((other / "metadata.json").read_text())
    meta["content_hash"] = "sha256:" + "0" * 64
    (other / "metadata.json").write_text(json.dumps(meta))
    assert experiment.main([*args, "--scratch", str(tmp_path / "s"), "--data", str(other)]) == 2
    assert "pass --data with the prep it trained on" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()  # refused before anything was written
    split_file = copy / "fold1-seed0" / "student_dkd" / run_dir.SPLIT_FILE
    original = split_file.read_text()
    split = json.loads(original)
    moved_id = split["test_ids"].pop()  # a split the protocol's rule no longer makes
    split["train_ids"] = sorted([*split["train_ids"], moved_id])
    split_file.write_text(json.dumps(split))
    rc = experiment.main([*args, "--scratch", str(tmp_path / "s"), "--data", str(tiny_prep_dir)])
    assert rc == 2 and "a run trained on another split" in capsys.readouterr().err  # no MISMATCH
    split_file.write_text(original)
    moved = tmp_path / "moved_prep"
    shutil.copytree(tiny_prep_dir, moved)
    assert experiment.main([*args, "--scratch", str(tmp_path / "s"), "--data", str(moved)]) == 0
    assert "fold1-seed0/student_dkd: MATCH (bit for bit)" in capsys.readouterr().out


def test_a_baseline_fit_shared_by_the_seeds_of_a_fold_counts_once(exp, tmp_path):
    """An audit: a loso experiment of two seeds fitted each fold's baseline once per seed (the
    same fit: it does not depend on the seed) and summarised every copy as a run: 4 "runs"
    for 2 fits, a std too small, each utterance counted twice in the pooled matrix."""
    from dkd_jax.experiment import checks, report, spec

    exp_dir = exp[0]
    fits = {f: (exp_dir / f"fold{f}-seed0/baseline/results.json").read_text() for f in (0, 1)}
    copy = tmp_path / "exp"
    plans = []
    for fold in (0, 1):
        for seed in (0, 1):
            group = f"fold{fold}-seed{seed}"
            path = checks.baseline_file(copy, group, "baseline")
            path.parent.mkdir(parents=True)
            path.write_text(fits[fold])
            cfg = config_lib.get_config("tiny")
            plans.append(spec.RunPlan(group, "teacher", fold, seed, cfg))
    rows = report.collect_baselines(copy, plans)
    assert [(r["group"], r["model"]) for r in rows] == [
        ("fold0-seed0", "baseline"),
        ("fold1-seed0", "baseline"),
    ]
    stats = report.summarize_rows(rows, ["baseline"])["baseline"]
    was = exp[1]["models"]["baseline"]  # the fixture's experiment: seed 0 only
    assert stats["runs"] == 2 and stats["wa"] == was["wa"] and stats["ua"] == was["ua"]
    assert stats["pooled_confusion_matrix"] == was["pooled_confusion_matrix"]
    # A validation fit next to the test fit in one seed only (a --validation-only pass cut
    # short): the test fit still counts once.
    val = json.loads(fits[0]) | {"fingerprint": "validation fit", "wa": 0.25}
    path = checks.baseline_file(copy, "fold0-seed0", "baseline", validation=True)
    path.write_text(json.dumps(val))
    rows = report.collect_baselines(copy, plans)
    assert [(r["group"], r["wa"], r["val_wa"]) for r in rows] == [
        ("fold0-seed0", json.loads(fits[0])["wa"], 0.25),
        ("fold1-seed0", json.loads(fits[1])["wa"], None),
    ]


def test_runs_that_learnt_nothing_are_noted_in_the_summary(tmp_path, capsys):
    """A journey on EmoDB: a fold's teacher predicted one class for every test utterance and
    neither the runner's summary nor the student's training said so."""
    from dkd_jax import train_lib
    from dkd_jax.experiment import report

    note = "predicts angry for all 81 utterances: UA 25.0 %"
    summary = {
        "runs": [
            {"group": "fold0-seed0", "workdir": "fold0-seed0/teacher", "collapse": note},
            {"group": "fold1-seed0", "workdir": "fold1-seed0/teacher", "collapse": None},
        ]
    }
    (line,) = [n for n in report._notes(summary, validation_only=False) if "learnt" in n]
    assert line.startswith(
        f"1 run(s) learnt nothing usable on their test set: fold0-seed0/teacher {note}."
    )
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    cm = [[0, 0, 0, 20], [0, 0, 0, 20], [0, 0, 0, 20], [0, 0, 0, 21]]
    results = {k: 0.25 for k in run_dir.RESULT_KEYS} | {
        "confusion_matrix": cm,
        "label_names": ["neutral", "happy", "sad", "angry"],
    }
    (teacher / run_dir.RESULTS_FILE).write_text(json.dumps(results))
    train_lib._warn_if_collapsed_teacher(teacher)
    assert capsys.readouterr().err.startswith(
        f"warning: the teacher {teacher}: on its test set it {note}; a student distils little"
    )


def test_a_split_the_prep_cannot_make_is_refused_before_the_spec_is_written(
    tiny_prep_dir, tmp_path, monkeypatch
):
    """An audit: loso on a one-session prep failed after experiment.json was written, and the
    natural fix (another --protocol) was then refused as "an experiment with other settings"."""
    from dkd_jax.experiment import runner

    meta = json.loads(json.dumps(records.load_metadata(tiny_prep_dir)))
    for u in meta["utterances"]:
        u["session"] = "Session1"
    monkeypatch.setattr(runner.records, "load_metadata", lambda _: meta)
    spec = experiment.make_spec(data=tiny_prep_dir, protocol="loso", preset="tiny", folds=(0,))
    exp_dir = tmp_path / "exp"
    with pytest.raises(experiment.ExperimentError, match="loso needs at least 2 sessions"):
        experiment.run_experiment(exp_dir, spec, progress=False, quiet=True)
    assert not (exp_dir / experiment.EXPERIMENT_FILE).exists()
