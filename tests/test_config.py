"""Tests of dkd_jax.config: presets, typed overrides, errors, dict round trip."""

import dataclasses
import json
import re
import typing

import jax
import pytest

from dkd_jax import config as config_lib


def test_paper_preset_is_the_lineage_recipe():
    cfg = config_lib.get_config("paper")
    o, k = cfg.optim, cfg.kd
    assert (o.learning_rate, o.weight_decay, o.num_epochs, o.batch_size) == (1e-3, 1e-6, 50, 32)
    assert (o.schedule, o.decay_every, o.decay_factor) == ("step_epochs", 10, 0.1)
    assert (k.loss, k.alpha, k.beta, k.temperature, k.warmup_epochs) == ("dkd", 1.0, 8.0, 4.0, 5.0)
    assert cfg.model.teacher.preset == "teacher" and cfg.model.teacher.attention_heads is None
    assert cfg.model.student.preset == "student"
    assert cfg.data.protocol == "paper" and cfg.data.split_seed == 111111


def test_default_preset_counts_its_schedule_in_steps():
    cfg = config_lib.get_config("default")
    assert cfg.optim.schedule == "step" and cfg.optim.decay_every == 2500
    assert cfg.data.protocol == "loso"
    assert not cfg.augment.enabled
    # The paper's model/loss/optimiser, only the schedule differs.
    paper = config_lib.get_config("paper")
    assert cfg.kd == paper.kd and cfg.model == paper.model
    assert cfg.optim.learning_rate == paper.optim.learning_rate


def test_emodb_preset_changes_only_what_small_corpora_need():
    cfg, base = config_lib.get_config("emodb"), config_lib.get_config("default")
    assert cfg.data.normalization == "speaker" and cfg.data.protocol == "loso"
    assert (cfg.optim.learning_rate, cfg.optim.schedule, cfg.optim.warmup_steps) == (
        3e-3,
        "cosine",
        45,
    )
    assert cfg.augment.enabled and cfg.augment.mixup_alpha == 0.0
    assert (cfg.kd.alpha, cfg.kd.beta, cfg.kd.temperature) == (1.0, 0.5, 1.0)
    # Same architectures, batch, epochs and weight decay as the paper's recipe.
    assert cfg.model == base.model
    assert (cfg.optim.batch_size, cfg.optim.num_epochs, cfg.optim.weight_decay) == (32, 50, 1e-6)


@pytest.mark.parametrize("name", sorted(config_lib.PRESETS))
def test_every_preset_round_trips_through_json(name):
    cfg = config_lib.get_config(name)
    text = config_lib.dumps(cfg)
    back = config_lib.loads(text)
    assert back == cfg
    assert config_lib.to_dict(back) == json.loads(text)
    assert config_lib.diff(cfg, back) == {}


def test_presets_are_fresh_objects():
    a = config_lib.get_config("default")
    a.kd.beta = 123.0
    assert config_lib.get_config("default").kd.beta == 8.0


def test_overrides_are_parsed_from_field_types():
    cfg = config_lib.apply_overrides(
        config_lib.get_config("default"),
        [
            "kd.beta=2",
            "--config.optim.learning_rate=3e-4",
            "config.train.progress=false",
            "optim.num_epochs=1e1",
            "model.student.attention_heads=8",
            "model.teacher.init=none",
            "data.protocol=paper",
            "train.seed=1_000",
        ],
    )
    assert cfg.kd.beta == 2.0 and isinstance(cfg.kd.beta, float)
    assert cfg.optim.learning_rate == 3e-4
    assert cfg.train.progress is False
    assert cfg.optim.num_epochs == 10 and isinstance(cfg.optim.num_epochs, int)
    assert cfg.model.student.attention_heads == 8
    assert cfg.model.teacher.init is None
    assert cfg.data.protocol == "paper"
    assert cfg.train.seed == 1000
    changed = config_lib.diff(config_lib.get_config("default"), cfg)
    assert set(changed) == {
        "kd.beta",
        "optim.learning_rate",
        "train.progress",
        "optim.num_epochs",
        "model.student.attention_heads",
        "data.protocol",
        "train.seed",
    }


def test_overrides_do_not_mutate_the_input():
    base = config_lib.get_config("default")
    config_lib.apply_overrides(base, ["kd.beta=2"])
    assert base.kd.beta == 8.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("kd.betaa=2", "kd has no 'betaa'"),
        ("kdd.beta=2", "config has no 'kdd'"),
        ("kd.beta=two", "bad value 'two' for kd.beta: expected float"),
        ("train.seed=1.5", "expected int"),
        ("train.progress=maybe", "expected bool"),
        ("data.protocol=kfold", "one of 'loso', 'paper', 'none'"),
        ("optim=3", "'optim' is a group"),
        ("kd.beta.x=3", "kd.beta is not a group"),
        ("kd.beta", "expected group.field=value"),
        ("kd.temperature=0", "kd.temperature must be > 0"),
        ("optim.batch_size=-4", "optim.batch_size must be > 0"),
        ("data.validation_fraction=1.5", "validation_fraction must be in (0, 1)"),
    ],
)
def test_bad_overrides_name_the_field_and_value(override, message):
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.apply_overrides(config_lib.get_config("default"), [override])
    assert message in str(e.value)


def test_unknown_preset_and_unknown_json_field():
    with pytest.raises(config_lib.ConfigError, match="unknown config preset 'fast'"):
        config_lib.get_config("fast")
    d = config_lib.to_dict(config_lib.get_config("tiny"))
    d["kd"]["gamma"] = 1.0
    with pytest.raises(config_lib.ConfigError, match=r"kd: unknown field\(s\) \['gamma'\]"):
        config_lib.from_dict(d)
    with pytest.raises(config_lib.ConfigError, match=r"x\.json: not valid JSON"):
        config_lib.loads("{", source="x.json")


def test_every_field_is_commented_in_the_source():
    import inspect

    src = inspect.getsource(config_lib)
    for group in (
        config_lib.DataConfig,
        config_lib.ArchConfig,
        config_lib.ModelConfig,
        config_lib.KDConfig,
        config_lib.OptimConfig,
        config_lib.AugmentConfig,
        config_lib.TrainConfig,
        config_lib.Config,
    ):
        lines = inspect.getsource(group).splitlines()
        for f in dataclasses.fields(group):
            i = next(j for j, line in enumerate(lines) if line.strip().startswith(f"{f.name}:"))
            assert lines[i - 1].strip().startswith("#"), (
                f"{group.__name__}.{f.name} lacks a comment"
            )
    assert "class Config" in src


def test_augment_enabled_flag():
    aug = config_lib.AugmentConfig()
    assert not aug.enabled
    for field, value in (("time_shift_frames", 3), ("freq_masks", 1), ("mixup_alpha", 0.2)):
        assert dataclasses.replace(aug, **{field: value}).enabled


def _float_fields(cls=config_lib.Config, prefix=""):
    """Dotted paths of every float field of the config (walking the nested groups)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, path = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from _float_fields(tp, path + ".")
        elif tp is float:
            yield path


def test_float_fields_are_found():
    fields = set(_float_fields())
    assert {"optim.learning_rate", "kd.beta", "augment.mixup_alpha"} <= fields
    assert "optim.num_epochs" not in fields and len(fields) >= 15


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "NaN", "Infinity", "1e999", "-1", "0"])
def test_learning_rate_must_be_finite_and_positive(value):
    # Before: --config.optim.learning_rate=inf passed validation.
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.apply_overrides(
            config_lib.get_config("default"), [f"--config.optim.learning_rate={value}"]
        )
    message = str(e.value)
    assert "optim.learning_rate" in message and "\n" not in message
    assert ("finite" in message) if value not in ("-1", "0") else ("must be > 0" in message)


def test_a_seed_jax_would_truncate_is_refused():
    # Before: 99999999999999999999 passed validation, then an OverflowError traceback inside
    # jax.random.PRNGKey; 2**32 + 5 trained the very run of seed 5 (and -1 that of 2**32 - 1).
    assert (jax.random.PRNGKey(2**32 + 5) == jax.random.PRNGKey(5)).all()  # why
    for seed in (2**32, 2**32 + 5, -1, 99999999999999999999):
        with pytest.raises(config_lib.ConfigError, match=r"train\.seed must be in \[0, 2\*\*32\)"):
            config_lib.apply_overrides(config_lib.get_config("tiny"), [f"train.seed={seed}"])
    for seed in (0, 2**32 - 1, 999999):
        cfg = config_lib.apply_overrides(config_lib.get_config("tiny"), [f"train.seed={seed}"])
        assert cfg.train.seed == seed


@pytest.mark.parametrize("path", sorted(_float_fields()))
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_no_float_field_accepts_a_non_finite_value(path, value):
    pattern = rf"^bad value '{value}' for {re.escape(path)}: expected a finite float$"
    with pytest.raises(config_lib.ConfigError, match=pattern):
        config_lib.apply_overrides(config_lib.get_config("tiny"), [f"{path}={value}"])


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_floats_are_refused_in_config_json_and_in_code(value):
    d = config_lib.to_dict(config_lib.get_config("tiny"))
    d["optim"]["learning_rate"] = value
    with pytest.raises(config_lib.ConfigError, match=r"optim\.learning_rate: expected a finite"):
        config_lib.from_dict(d)
    text = json.dumps(d)  # Python writes Infinity / NaN, which json.loads reads back
    with pytest.raises(config_lib.ConfigError, match=r"^run/config\.json: bad value .* for optim"):
        config_lib.loads(text, source="run/config.json")
    cfg = config_lib.get_config("tiny")
    cfg.kd.temperature = value  # set in code, then validated
    with pytest.raises(config_lib.ConfigError, match=r"kd\.temperature: expected a finite"):
        cfg.validate()


def test_fields_that_may_be_zero_stay_valid():
    zero = [
        "optim.weight_decay=0",
        "optim.warmup_steps=0",
        "optim.grad_clip_norm=0",
        "kd.warmup_epochs=0",
        "kd.alpha=0",
        "kd.beta=0",
        "kd.kd_weight=0",
        "kd.ce_weight=0",
        "augment.mixup_alpha=0",
        "optim.b1=0",
        "train.checkpoint_every_steps=0",
    ]
    for item in zero:  # each on its own (all of the objective's weights at once is refused)
        config_lib.apply_overrides(config_lib.get_config("default"), [item])
    cfg = config_lib.apply_overrides(config_lib.get_config("default"), zero[:5])
    assert cfg.optim.weight_decay == 0.0 and cfg.kd.warmup_epochs == 0.0
    small = config_lib.apply_overrides(cfg, ["optim.learning_rate=1e-9"])
    assert small.optim.learning_rate == 1e-9
    with pytest.raises(config_lib.ConfigError, match=r"optim\.num_epochs: expected int"):
        config_lib.apply_overrides(config_lib.get_config("default"), ["optim.num_epochs=inf"])


def test_architecture_presets_are_the_models_and_a_misspelt_one_is_refused():
    from dkd_jax import models

    assert set(config_lib.ARCH_PRESETS) == set(models.MODEL_PRESETS)
    # Before: any name passed; the run (or an experiment, after writing experiment.json) then
    # failed in models.build_model without naming the field.
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.apply_overrides(
            config_lib.get_config("default"), ["model.teacher.preset=area_teachr"]
        )
    assert "model.teacher.preset must be one of" in str(e.value) and "'area_teachr'" in str(e.value)
    for name in config_lib.ARCH_PRESETS:
        config_lib.apply_overrides(
            config_lib.get_config("default"), [f"model.student.preset={name}"]
        )


@pytest.mark.parametrize(
    "loss, weights",
    [
        ("ce", ["kd.ce_weight=0"]),
        ("dkd", ["kd.ce_weight=0", "kd.alpha=0", "kd.beta=0"]),
        ("kd", ["kd.ce_weight=0", "kd.kd_weight=0"]),
        ("tckd", ["kd.ce_weight=0", "kd.alpha=0"]),
        ("nckd", ["kd.ce_weight=0", "kd.beta=0"]),
    ],
)
def test_a_student_objective_with_every_weight_zero_is_refused(loss, weights):
    # Before: loss 0.0 and gradient norm 0.0 at every step, exit 0.
    base = config_lib.apply_overrides(config_lib.get_config("tiny"), [f"kd.loss={loss}"])
    with pytest.raises(config_lib.ConfigError, match=f"kd.loss='{loss}' has every weight at 0"):
        config_lib.apply_overrides(base, weights)
    for i in range(len(weights)):  # any one weight left on trains
        config_lib.apply_overrides(base, weights[:i] + weights[i + 1 :])
    teacher = config_lib.apply_overrides(base, ["model.role=teacher"])
    config_lib.apply_overrides(teacher, weights)  # a teacher trains on CE alone: not checked


def test_numbers_jax_cannot_hold_are_refused_naming_the_field():
    cfg = config_lib.get_config("default")
    for item, message in (
        ("optim.decay_factor=10", "optim.decay_factor must be in (0, 1]"),  # grew the rate 10x
        ("optim.decay_factor=0", "optim.decay_factor must be in (0, 1]"),
        ("optim.num_epochs=1e12", "optim.num_epochs must be <= 2**31 - 1"),  # OverflowError
        ("optim.warmup_steps=1e20", "optim.warmup_steps must be <= 2**31 - 1"),
        ("augment.time_shift_frames=2147483648", "augment.time_shift_frames must be <="),
        (
            "optim.learning_rate=1e-320",
            "optim.learning_rate = 1e-320 is beyond float32 (it would become zero)",
        ),  # trained nothing, exit 0
        ("optim.learning_rate=1e300", "(it would become infinity)"),
        ("kd.beta=1e39", "kd.beta = 1e+39 is beyond float32"),
        ("data.split_seed=-5", "data.split_seed must be >= 0, got -5"),  # named no field
    ):
        with pytest.raises(config_lib.ConfigError) as e:
            config_lib.apply_overrides(cfg, [item])
        assert message in str(e.value), (item, str(e.value))
    ok = config_lib.apply_overrides(
        cfg,
        [
            "optim.decay_factor=1",
            "optim.num_epochs=2147483647",
            "optim.learning_rate=1e-30",
            "train.on_device_max_bytes=8589934592",  # a byte count, not an int32
            "data.split_seed=99999999999",  # numpy's generator takes any non-negative seed
        ],
    )
    assert ok.optim.decay_factor == 1.0 and ok.train.on_device_max_bytes == 2**33


def test_sigterm_raises_terminated_inside_the_block_only():
    """cli_args.sigterm_as_interrupt: what train.py and the experiment runner stop on."""
    import os
    import signal
    import time

    from dkd_jax import cli_args

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(cli_args.Terminated) as info, cli_args.sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
    assert isinstance(info.value, KeyboardInterrupt)  # every Ctrl-C path handles it
    assert cli_args.stopped_message(info.value) == ("terminated (SIGTERM)", 143)
    assert cli_args.stopped_message(KeyboardInterrupt()) == ("interrupted", 130)
    assert signal.getsignal(signal.SIGTERM) == before
