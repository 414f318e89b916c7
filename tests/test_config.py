"""Every option composes; bad overrides fail before any compute with a clear message."""

from __future__ import annotations

import subprocess

import pytest
from conftest import CONF, ROOT, compose_cfg, train_cmd
from hydra.errors import ConfigCompositionException, MissingConfigException

from bayes_prune.config import Config, ConfigError, validate
from bayes_prune.methods.bayes_factor import Gate

GROUPS = ["dataset", "model", "pruner", "prior", "sparsity", "trainer"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_of_every_group_composes_and_validates(group, option):
    cfg = validate(compose_cfg([f"{group}='{option}'"]))
    assert isinstance(cfg, Config)
    if group in ("dataset", "model", "pruner", "prior"):
        name = getattr(cfg, group).name
        name = getattr(name, "value", name)
        # An option is the schema's name itself or a preset of it (synthetic_cifar10 -> synthetic).
        assert option == name or option.startswith(f"{name}_") or group == "pruner"


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_file_composes(experiment):
    cfg = validate(compose_cfg([f"experiment={experiment}"]))
    assert cfg.name != "default"  # an experiment names its sweep folder


def test_defaults_are_the_papers_settings():
    cfg = validate(compose_cfg())
    assert (cfg.trainer.lr, cfg.trainer.batch_size, cfg.trainer.epochs) == (1e-3, 64, 25)
    assert cfg.prior.sigma == 1.0 and cfg.seed == 0 and cfg.dataset.name.value == "mnist"
    bayes = validate(compose_cfg(["pruner=bayes_random"]))
    assert bayes.pruner.gate is Gate.lagged and bayes.pruner.beta == 1.0
    assert not bayes.pruner.prune_output and bayes.pruner.mask.value == "persistent"


def test_seed_zero_is_kept():
    assert validate(compose_cfg(["seed=0"])).seed == 0


@pytest.mark.parametrize("override,needle", [
    ("sparsity.percent=100", "sparsity.percent=100.0: expected a number in [0, 100)"),
    ("sparsity.percent=-5", "sparsity.percent=-5.0"),
    ("prior.sigma=0", "prior.sigma=0.0: expected a finite number > 0"),
    ("prior.scale=-1", "prior.scale=-1.0"),
    ("pruner=bayes_random pruner.beta=0", "pruner.beta=0.0: expected a finite number > 0"),
    ("pruner=magnitude pruner.phases=[train,prune]", "method 'magnitude' has no prune phase"),
    ("trainer.epochs=0", "trainer.epochs=0: expected an integer >= 1"),
    ("trainer.lr=-0.1", "trainer.lr=-0.1"),
    ("trainer.device=tpu", "trainer.device='tpu'"),
])
def test_out_of_range_values_raise_config_error_naming_value_and_range(override, needle):
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg(override.split(" ")))
    assert needle in str(err.value)


@pytest.mark.parametrize("override,exc,needle", [
    ("pruner=foo", MissingConfigException, "Could not find 'pruner/foo'"),
    ("sparsity='33'", MissingConfigException, "Could not find 'sparsity/33'"),
    ("trainer.epoch=3", ConfigCompositionException, "Key 'epoch' not in 'TrainerConfig'"),
    ("pruner=bayes_random pruner.gate=sometimes", ConfigCompositionException,
     "expected one of [none, lagged, tentative]"),
    # a key of another method's schema is an error, not silently ignored
    ("pruner=none pruner.gate=lagged", ConfigCompositionException, "Key 'gate' not in 'UnprunedConfig'"),
    ("model=fcn model.channels=[4]", ConfigCompositionException, "Key 'channels' not in 'FCNConfig'"),
    ("trainer.lr=abc", ConfigCompositionException, "could not be converted to Float"),
])
def test_unknown_options_keys_and_types_fail_at_compose_time(override, exc, needle):
    with pytest.raises(exc) as err:
        compose_cfg(override.split(" "))
    text = str(err.value) + str(getattr(err.value, "__cause__", ""))
    assert needle in text


@pytest.mark.parametrize("override,needle", [
    ("sparsity=100", "Could not find 'sparsity/100'"),
    ("prior.sigma=-1", "invalid value prior.sigma=-1.0: expected a finite number > 0"),
    ("trainer.epochs=0", "invalid value trainer.epochs=0"),
    ("model.widths=[8]", "Key 'widths' not in 'FCNConfig'"),
])
def test_cli_rejects_bad_overrides_fast_with_nonzero_exit(tmp_path, override, needle):
    # MNIST is not under tmp_path: a run that got past validation would fail on data, not config.
    proc = subprocess.run(train_cmd(override, f"paths.data_dir={tmp_path}",
                                    f"hydra.run.dir={tmp_path}/run"),
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode != 0
    assert needle in proc.stdout + proc.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_cli_sweeps_numeric_sparsity_options(tmp_path):
    from bayes_prune.cli import quote_numeric_choices

    assert quote_numeric_choices(["sparsity=25,50", "seed=1"]) == ["sparsity='25','50'", "seed=1"]
    assert validate(compose_cfg(["pruner=magnitude", "sparsity='90'"])).sparsity.percent == 90.0


def test_unpruned_runs_ignore_the_sparsity_target():
    # so a sweep over sparsity trains the unpruned network once per seed, in the sparsity=0 folder
    assert validate(compose_cfg(["pruner=none", "sparsity='90'"])).sparsity.percent == 0.0
