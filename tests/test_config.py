import re

import pytest

from pneumo_dist import config as config_lib
from pneumo_dist.config import ConfigError, RunConfig

REPO_CONFIGS = ["configs/demo.yaml", "configs/kaggle.yaml", "configs/kaggle_cpu.yaml", "configs/mnist.yaml"]


@pytest.mark.parametrize("path", REPO_CONFIGS)
def test_shipped_configs_load_and_validate(path):
    config = config_lib.load_config(path)
    assert isinstance(config, RunConfig) and config.warnings() == []


def test_the_cpu_recipe_opens_with_the_make_shards_command_of_its_image_size():
    """The first comment line is the command that makes the shards the recipe expects."""
    with open("configs/kaggle_cpu.yaml") as file:
        first = file.readline()
    match = re.fullmatch(r"#   python jobs/make_shards\.py \S+ (\S+) --size (\d+)\n", first)
    config = config_lib.load_config("configs/kaggle_cpu.yaml")
    assert match and match.group(1) == config.data.manifest_uri
    assert int(match.group(2)) == config.data.image_size_px


# Not a GPU recipe (the defaults are: ImageNet weights at 224 px), which has a warning of its own.
CPU_RECIPE = ["model.weights=none", "data.image_size_px=64"]


@pytest.mark.parametrize(
    "overrides, warning",
    [
        (["tune.grace_period=1", "train.warmup_epochs=1"], "grace_period .1. is not above the warm-up"),
        (["tune.grace_period=2", "train.head_warmup_epochs=2"], "not above the warm-up .* up to 2"),
        (["tune.grace_period=5", "train.epochs=5"], "ASHA cannot stop any trial early"),
    ],
)
def test_settings_that_defeat_asha_are_warned_of(overrides, warning):
    (found,) = config_lib.load_config(None, [*CPU_RECIPE, *overrides]).warnings()
    assert re.search(warning, found)
    assert not config_lib.load_config(None, [*CPU_RECIPE, *overrides, "tune.scheduler=fifo"]).warnings()


def test_the_warm_up_warning_sees_the_search_space(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "tune:\n  grace_period: 2\n  search_space:\n    train.warmup_epochs: {uniform: [0.5, 3]}\n"
    )
    (found,) = config_lib.load_config(str(path), CPU_RECIPE).warnings()
    assert "up to 3" in found


def test_an_image_size_resnet50_cannot_take_is_refused():
    with pytest.raises(ConfigError, match="data.image_size_px=8"):
        config_lib.load_config(None, ["data.image_size_px=8"])


def test_overrides_are_typed(tmp_path):
    config = config_lib.load_config(
        "configs/demo.yaml",
        ["train.learning_rate=3e-4", "train.epochs=2", "model.unfreeze=all", "data.deterministic=true"],
    )
    assert config.train.learning_rate == 3e-4 and config.train.epochs == 2
    assert config.model.unfreeze == "all" and config.data.deterministic is True
    assert config_lib.load_config(None, ["model.unfreeze=40"]).model.unfreeze == 40


def test_yaml_floats_without_a_dot_are_accepted(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  learning_rate: 1e-4\n")
    assert config_lib.load_config(str(tmp_path / "c.yaml")).train.learning_rate == 1e-4


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.lr=0.1"], "unknown key train.lr"),
        (["trainer.epochs=3"], "unknown key trainer.epochs; did you mean train.epochs"),
        (["train.epochs=many"], "train.epochs='many': must be int"),
        (["train.epochs=2.5"], "train.epochs=2.5: must be int"),
        (["train.optimizer=rmsprop"], "train.optimizer='rmsprop': must be one of adam, adamw, sgd"),
        (["model.unfreeze=-3"], "model.unfreeze=-3"),
        (["model.weights=resnet.pt"], "model.weights='resnet.pt': a weights file must be .h5"),
        (["data.cache=ram"], "data.cache='ram'"),
        (["augment.horizontal_flip=maybe"], "augment.horizontal_flip='maybe': must be bool"),
        (["train.head_warmup_epochs=10", "train.epochs=3"], "head_warmup_epochs=10"),
        (["epochs=3"], "expected section.key=value"),
        (["tune.search_alg=hyperopt"], "tune.search_alg='hyperopt': must be random or optuna"),
        (["train.threshold_policy=prevalence"], "threshold_policy='prevalence': needs train.deployment_prev"),
        (
            [
                "train.threshold_policy=prevalence",
                "train.deployment_prevalence=0.3",
                "train.calibration=none",
            ],
            "needs .* calibrated probabilities",
        ),
        (["train.deployment_prevalence=1.0"], "deployment_prevalence=1.0: must be in .0, 1., or 0"),
        (
            ["train.calibration=isotonic"],
            "train.calibration='isotonic': must be one of platt, platt_capped, none",
        ),
        (["data.equalize=clahe"], "data.equalize='clahe': must be one of none, histogram"),
        (["data.border_crop=0.3"], "data.border_crop=0.3: must be in .0, 0.25."),
        (["train.ema_decay=1.0"], "train.ema_decay=1.0: must be in .0, 1."),
    ],
)
def test_bad_configs_fail_fast_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config_lib.load_config("configs/demo.yaml", overrides)


DID_YOU_MEAN = "; did you mean"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["train.learning_rte=1e-3"],
            "unknown key train.learning_rte" + DID_YOU_MEAN + " train.learning_rate?",
        ),
        (
            ["model.learning_rate=1e-3"],
            "unknown key model.learning_rate" + DID_YOU_MEAN + " train.learning_rate?",
        ),
        (["data.imgsize=64"], "unknown key data.imgsize" + DID_YOU_MEAN + " data.image_size_px?"),
        (["dta.zzz=1"], "unknown key dta.zzz (sections: data, augment, model, train, tune)"),
        (["data.zzz=1"], "unknown key data.zzz (known: data.manifest_uri, data.image_size_px, "),
        (["train.epochs=0"], "must be >= 1"),
    ],
)
def test_a_mistyped_key_or_value_names_its_set_and_the_nearest_key(overrides, message):
    with pytest.raises(ConfigError) as raised:
        config_lib.load_config("configs/demo.yaml", overrides)
    assert str(raised.value).startswith(f"--set {overrides[0]}: {message}")


def test_a_mistyped_key_in_a_file_or_a_file_name_gets_a_did_you_mean(tmp_path):
    from pneumo_dist import storage

    (tmp_path / "run.yaml").write_text("train:\n  warmup_epoch: 1\n")
    with pytest.raises(
        ConfigError, match=r"run.yaml: unknown key train.warmup_epoch; did you mean train.warmup_epochs\?"
    ):
        config_lib.load_config(str(tmp_path / "run.yaml"))
    with pytest.raises(storage.StorageNotFound, match=r"no such file: .*run.yml; did you mean .*run.yaml\?"):
        config_lib.load_config(str(tmp_path / "run.yml"))


def test_config_round_trips_through_yaml(tmp_path):
    config = config_lib.load_config("configs/kaggle.yaml", ["train.epochs=3"])
    (tmp_path / "again.yaml").write_text(config_lib.to_yaml(config))
    assert config_lib.load_config(str(tmp_path / "again.yaml")) == config


def test_a_missing_config_file_is_named(tmp_path):
    from pneumo_dist import storage

    with pytest.raises(storage.StorageNotFound, match="nope.yaml"):
        config_lib.load_config(str(tmp_path / "nope.yaml"))
