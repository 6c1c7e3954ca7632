import pytest

from rn50_ray.cli import main
from rn50_ray.config import Config, load_config, parse_override
from rn50_ray.errors import ConfigError


def test_defaults_are_nvidia_recipe():
    cfg = Config()
    assert (cfg.optim.lr_per_256, cfg.optim.momentum, cfg.optim.weight_decay) == (0.256, 0.875, 1 / 32768)
    assert (cfg.optim.label_smoothing, cfg.schedule.kind, cfg.schedule.warmup_epochs) == (0.1, "cosine", 8.0)


@pytest.mark.parametrize("recipe, epochs, mixup", [("rn50_50e", 50, 0.0), ("rn50_90e", 90, 0.0), ("rn50_250e", 250, 0.2)])
def test_recipes(recipe, epochs, mixup):
    from rn50_ray.cli import RECIPES

    cfg = load_config([str(RECIPES / f"{recipe}.yaml")])
    assert (cfg.schedule.epochs, cfg.optim.mixup_alpha, cfg.batch.global_size) == (epochs, mixup, 2048)


def test_overrides_and_round_trip(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr_per_256: 0.1\nschedule.epochs: 50\n")
    cfg = load_config([str(f)], dict([parse_override("optim.momentum=0.9"), parse_override("schedule.milestones=[1, 2]")]))
    assert (cfg.optim.lr_per_256, cfg.schedule.epochs, cfg.optim.momentum) == (0.1, 50, 0.9)
    assert cfg.schedule.milestones == [1, 2]
    assert Config.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("optim.lr_per_256", -0.1, "optim.lr_per_256: expected a number > 0, got -0.1"),
        ("batch.per_worker", 0, "batch.per_worker: expected a number > 0, got 0"),
        ("system.precision", "fp8", "system.precision: expected one of auto, fp32, tf32, amp-fp16, amp-bf16, got 'fp8'"),
        ("data.backend", "tfrecord", "data.backend: expected one of auto, synthetic, pytorch, dali-cpu, dali-gpu"),
        ("optim.lrr", 1, "'optim.lrr' is not a config key; valid keys are optim.lr_per_256"),
        ("schedule.epochs", "ten", "schedule.epochs: expected int, got 'ten'"),
        ("scale.workers", "4:2", "scale.workers: expected N or MIN:MAX"),
    ],
)
def test_validation_errors_name_field_and_expectation(key, value, expected):
    with pytest.raises(ConfigError) as err:
        load_config([], {key: value})
    assert expected in str(err.value)


def test_file_errors_name_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("optim:\n  momentum: 1.5\n")
    with pytest.raises(ConfigError, match=f"{f}: optim.momentum: expected a number in"):
        load_config([str(f)])
    with pytest.raises(ConfigError, match=r"missing\.yaml: config file not found"):
        load_config([str(tmp_path / "missing.yaml")])


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--lr-per-256", "-1"], "optim.lr_per_256: expected a number > 0, got -1.0"),
        (["--batch-size", "0"], "batch.per_worker: expected a number > 0, got 0"),
        (["--precision", "fp64"], "system.precision: expected one of"),
        (["--backend", "mxnet"], "data.backend: expected one of"),
        (["--epochs", "x"], "argument --epochs: invalid int value: 'x'"),
        (["--data", "/nonexistent/imagenet"], "/nonexistent/imagenet: data folder not found"),
    ],
)
def test_cli_bad_input_is_one_line_and_status_2(args, expected, capsys, tmp_path):
    assert main(["train", "--storage", str(tmp_path / "runs"), *args]) == 2
    err = capsys.readouterr().err
    assert expected in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "runs").exists()
