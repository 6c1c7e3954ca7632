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
    from rn50_ray.flags import RECIPES

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
        (["--precision", "fp64"], "argument --precision: invalid choice: 'fp64' (choose from 'auto', 'fp32', 'tf32'"),
        (["--backend", "mxnet"], "argument --backend: invalid choice: 'mxnet' (choose from 'auto', 'synthetic', 'pytorch'"),
        (["--workers", "8:4"], "--workers: scale.workers: expected N or MIN:MAX with 1 <= MIN <= MAX, got '8:4'"),
        (["--workers", "0"], "--workers: scale.workers: expected N or MIN:MAX with 1 <= MIN <= MAX, got '0'"),
        (["--workers", "a:b"], "--workers: scale.workers: expected N or MIN:MAX with 1 <= MIN <= MAX, got 'a:b'"),
        (["--recipe", "rn50_91e"], "argument --recipe: invalid choice: 'rn50_91e' (choose from 'cpu_demo'"),
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


def test_every_option_with_fixed_choices_lists_them_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--backend {auto,synthetic,pytorch,dali-cpu,dali-gpu}" in out
    assert "auto is dali-gpu on GPU workers, dali-cpu on CPU workers, pytorch without DALI" in out
    assert "--precision {auto,fp32,tf32,amp-fp16,amp-bf16}" in out and "--lr-schedule {cosine,step,linear,triangular}" in out
    assert "--tracking {required,optional,off}" in out and "--recipe {cpu_demo," in out


def test_a_recipes_warmup_shrinks_with_fewer_epochs_and_says_so(capsys, tmp_path):
    # cpu_demo warms up 1 of 6 epochs; --epochs 1 would leave no room: it is scaled, and one line says so.
    from rn50_ray.cli import build_parser
    from rn50_ray.flags import config_from_args

    cfg = config_from_args(build_parser().parse_args(["train", "--recipe", "cpu_demo", "--epochs", "1"]))
    assert (cfg.schedule.epochs, cfg.schedule.warmup_epochs) == (1, 0.167)
    note = capsys.readouterr().err.strip()
    assert note == (
        "note: schedule.warmup_epochs: the recipe's 1 of 6 epochs is scaled to 0.167 for 1 epochs; pass --warmup-epochs to choose"
    )
    cfg = config_from_args(build_parser().parse_args(["train", "--recipe", "cpu_demo", "--epochs", "3"]))
    assert cfg.schedule.warmup_epochs == 1 and capsys.readouterr().err == ""  # it still fits: unchanged
    assert main(["train", "--recipe", "cpu_demo", "--epochs", "1", "--warmup-epochs", "1", "--storage", str(tmp_path)]) == 2
    assert (
        "schedule.warmup_epochs: expected fewer than schedule.epochs (1), got 1.0; pass --warmup-epochs"
        in capsys.readouterr().err
    )


def test_the_version_has_one_source(capsys):
    import tomllib

    from rn50_ray import __version__
    from rn50_ray.flags import RECIPES

    pyproject = tomllib.loads((RECIPES.parent / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and pyproject["project"]["dynamic"] == ["version"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "rn50_ray.__version__"}
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"rn50-ray {__version__}"
