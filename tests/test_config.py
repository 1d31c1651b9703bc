import math

import pytest

from entroprl.config import ConfigError, load_config, parse_overrides


def test_defaults_validate():
    config = load_config()
    assert config.algorithm.policy_loss == "ppo"
    assert config.optim.lr == 1e-6


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-5\n  epochs: 2\nalgorithm:\n  policy_loss: clip_cov\n")
    config = load_config(path, ["optim.lr=3e-4", "algorithm.entropy_target=0.5"])
    assert config.optim.lr == 3e-4  # the override wins, and 3e-4 is a float, not a string
    assert config.optim.epochs == 2
    assert config.algorithm.policy_loss == "clip_cov"
    assert config.algorithm.entropy_target == 0.5


def test_int_accepted_for_float_and_none_for_optional():
    config = load_config(None, ["optim.lr=1", "algorithm.high_entropy_rho=null"])
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)
    assert config.algorithm.high_entropy_rho is None


@pytest.mark.parametrize(
    "override, named",
    [
        ("optim.lrr=1e-5", "optim.lrr"),
        ("optimizer.lr=1e-5", "optimizer"),
        ("optim.lr=fast", "optim.lr"),
        ("optim.epochs=1.5", "optim.epochs"),
        ("trainer.progress=3", "trainer.progress"),
        ("algorithm.policy_loss=clip-cov", "algorithm.policy_loss"),
        ("algorithm.loss_agg_mode=mean", "algorithm.loss_agg_mode"),
        ("optim.micro_batch_size=48", "optim.mini_batch_size"),
        ("rollout.temperature=0", "rollout.temperature"),
        ("algorithm.loss.ppo.clip_ratio_c=1", "algorithm.loss.ppo.clip_ratio_c"),
        (
            "algorithm.clip_ratio_c=3",
            r"algorithm.clip_ratio_c: now algorithm.loss.ppo.clip_ratio_c",
        ),
        ("algorithm.loss.nope.ratio=1", r"algorithm.loss.nope: unknown loss"),
        ("algorithm.loss.kl_cov.ratio=0", r"algorithm.loss.kl_cov.ratio"),
        ("algorithm.loss.clip_cov.lb=9", r"algorithm.loss.clip_cov.lb"),
        ("algorithm.loss.ce_gppo.beta1=-1", r"algorithm.loss.ce_gppo.beta1"),
        ("algorithm.loss.entropic.target=null", r"algorithm.loss.entropic.target"),
        ("algorithm.advantage=quantile", "algorithm.advantage"),
        ("algorithm.advantage_settings.qae.quantile=1.5", r"advantage_settings.qae.quantile"),
        ("algorithm.advantage_settings.passk.k=2.5", r"advantage_settings.passk.k"),
        ("algorithm.advantage_settings.nope.k=2", r"advantage_settings.nope: unknown estimator"),
        ("algorithm.plugins=[no_such_module_x]", r"algorithm.plugins\[0\]: cannot import"),
        ("trainer.strategy=zero3", "trainer.strategy"),
        ("optim.log_prob_micro_batch_size=0", "optim.log_prob_micro_batch_size"),
        ("model.compute_dtype=float16", "model.compute_dtype"),  # autocast: bfloat16 only
        ("model.compute_dtype=int8", "model.compute_dtype"),
        ("rollout.gpu_memory_utilization=1.5", "rollout.gpu_memory_utilization"),
    ],
)
def test_bad_values_name_the_key(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(None, [override])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["optim.lr"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


@pytest.mark.parametrize(
    "override, named",
    [
        ("optim.lr=.inf", "optim.lr"),
        ("optim.lr=.nan", "optim.lr"),
        ("optim.lr=100", "optim.lr"),
        ("optim.grad_clip=-1", "optim.grad_clip"),
        ("optim.beta2=1", "optim.beta2"),
        ("optim.weight_decay=1e30", "optim.weight_decay"),
        ("algorithm.entropy_coef=.inf", "algorithm.entropy_coef"),
        ("algorithm.entropy_target=.nan", "algorithm.entropy_target"),
        ("algorithm.overlong_factor=.nan", "algorithm.overlong_factor"),
        ("algorithm.overlong_factor=-1", "algorithm.overlong_factor"),
        ("algorithm.overlong_buffer=64", "algorithm.overlong_buffer"),
        ("algorithm.kl_coef=-0.1", "algorithm.kl_coef"),
        ("rollout.temperature=1e-30", "rollout.temperature"),
        ("rollout.temperature=1e30", "rollout.temperature"),
        ("trainer.eval_temperature=1e30", "trainer.eval_temperature"),
        ("trainer.eval_temperature=-1", "trainer.eval_temperature"),
        ("trainer.save_every=0", "trainer.save_every"),
        ("trainer.save_every=-1", "trainer.save_every"),
        ("trainer.keep_checkpoints=0", "trainer.keep_checkpoints"),
        ("trainer.keep_checkpoints=-1", "trainer.keep_checkpoints"),
        ("trainer.max_nonfinite_updates=0", "trainer.max_nonfinite_updates"),
        ("trainer.eval_every=-1", "trainer.eval_every"),
        ("trainer.out_dir=''", "trainer.out_dir"),
        ("trainer.device=gpu", "trainer.device"),
        ("data.train_size=0", "data.train_size"),
        ("data.test_size=0", "data.test_size"),
        ("data.task=gsm9k", "data.task"),
        ("data.max_prompt_chars=0", "data.max_prompt_chars"),
    ],
)
def test_nonfinite_and_absurd_values_name_the_key(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize(
    "override", ["trainer.device=cpu", "trainer.device=cuda:1", "trainer.eval_temperature=0"]
)
def test_sensible_values_pass(override):
    load_config(None, [override])


def test_estimator_and_loss_settings_from_overrides():
    config = load_config(
        None,
        [
            "algorithm.advantage=qae",
            "algorithm.advantage_settings.qae.quantile=0.3",
            "algorithm.advantage_settings.passk.k=2",
            "algorithm.policy_loss=entropic",
            "algorithm.loss.entropic.target=null",
            "algorithm.loss.entropic.law_a=0.05",
            "algorithm.loss.entropic.law_b=0.3",
        ],
    )
    assert config.estimator_settings().quantile == 0.3
    assert config.algorithm.advantage_settings["passk"].k == 2
    assert config.loss_settings().target_entropy() == pytest.approx(
        math.log((0.3 - 0.9 * 0.25) / 0.05)
    )
    # defaults filled in for the estimator in use, and written with the run's config
    assert load_config(None, ["algorithm.advantage=passk"]).estimator_settings().k == 4
    assert config.to_dict()["algorithm"]["advantage_settings"]["qae"] == {
        "quantile": 0.3,
        "norm_by_std": True,
    }


def test_validate_changes_nothing_and_the_loaded_config_holds_the_chosen_settings():
    """`Config.validate` only checks; reading a configuration fills in the chosen loss's and
    estimator's default settings, so that config.yaml holds every value the run uses."""
    import copy

    from entroprl.algos.advantages import PassKSettings
    from entroprl.algos.losses import ClipCovSettings
    from entroprl.config import Config

    config = Config()
    config.algorithm.policy_loss, config.algorithm.advantage = "clip_cov", "passk"
    before = copy.deepcopy(config)
    assert config.validate() is config and config == before
    assert config.algorithm.loss == {} and config.loss_settings() == ClipCovSettings()
    loaded = load_config(None, ["algorithm.policy_loss=clip_cov", "algorithm.advantage=passk"])
    assert loaded.algorithm.loss == {"clip_cov": ClipCovSettings()}
    assert loaded.algorithm.advantage_settings == {"passk": PassKSettings()}


@pytest.mark.parametrize(
    "section, key, value, named",
    [
        ("rollout", "top_p", 0.0, "rollout.top_p"),
        ("optim", "epochs", 0, "optim.epochs"),
        ("trainer", "strategy", "zero3", "trainer.strategy"),
        ("model", "lora_alpha", 0.0, "model.lora_alpha"),
        ("algorithm", "cov_scope", "global", "algorithm.cov_scope"),
    ],
)
def test_each_section_validates_itself(section, key, value, named):
    from entroprl.config import Config

    part = getattr(Config(), section)
    part.validate()
    setattr(part, key, value)
    with pytest.raises(ConfigError, match=rf"^{named}:"):
        part.validate()


def test_a_setting_out_of_range_is_named_by_its_dotted_key():
    from entroprl.algos.losses import PPOSettings
    from entroprl.config import Config

    config = Config()
    config.algorithm.loss = {"ppo": PPOSettings(clip_low=-1.0)}
    with pytest.raises(ConfigError, match=r"^algorithm\.loss\.ppo\.clip_low"):
        config.validate()
