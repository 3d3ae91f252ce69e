"""Config loading: defaults, YAML, CLI overrides and aliases, and clear errors naming what is valid."""

import math

import pytest

from vlp.config import PRETRAIN_ALIASES, ConfigError, LossConfig, PretrainConfig, from_dict, parse_cli


def parse(argv):
    return parse_cli(PretrainConfig, argv, PRETRAIN_ALIASES)


def test_defaults_and_aliases():
    cfg = parse(["--loss", "clip", "--batch-size", "256", "--model", "vit-b-16-siglip", "--steps", "7"])
    assert (cfg.loss.name, cfg.train.batch_size, cfg.model.name, cfg.train.steps) == ("clip", 256, "vit-b-16-siglip", 7)
    assert cfg.optim.lr == PretrainConfig().optim.lr


def test_dotted_keys_with_dashes_or_underscores():
    cfg = parse(["--loss.chunk_size", "4096", "--optim.warmup-steps", "3", "--data.train_num_samples", "null"])
    assert cfg.loss.chunk_size == 4096 and cfg.optim.warmup_steps == 3 and cfg.data.train_num_samples is None


def test_yaml_then_cli_override(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("loss: {name: clip, chunk_size: 64}\ntrain: {batch_size: 8, steps: 5}\n")
    cfg = parse(["--config", str(f), "--batch-size", "16"])
    assert (cfg.loss.name, cfg.loss.chunk_size, cfg.train.batch_size, cfg.train.steps) == ("clip", 64, 16, 5)


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--loss", "softmax"], "valid: clip, siglip"),
        (["--batch-size", "lots"], "train.batch_size: expected an integer"),
        (["--bach-size", "3"], "did you mean --batch-size"),
        (["--steps", "0"], "train.steps must be >= 1"),
    ],
)
def test_user_mistakes_are_one_line_errors(argv, fragment):
    with pytest.raises(ConfigError) as e:
        parse(argv)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_unknown_yaml_key_lists_valid_keys(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("loss: {nmae: clip}\n")
    with pytest.raises(ConfigError, match=r"unknown key loss.nmae \(did you mean loss.name\?\); valid keys: loss.name"):
        parse(["--config", str(f)])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found"):
        parse(["--config", "/nonexistent/x.yaml"])


def test_loss_defaults_per_loss():
    clip, sig = LossConfig(name="clip"), LossConfig(name="siglip")
    assert clip.resolved_init_logit_scale == pytest.approx(math.log(1 / 0.07))
    assert clip.resolved_max_logit_scale == pytest.approx(math.log(100)) and clip.resolved_init_logit_bias is None
    assert sig.resolved_init_logit_scale == pytest.approx(math.log(10)) and sig.resolved_init_logit_bias == -10


def test_from_dict_roundtrip():
    cfg = parse(["--loss", "clip", "--lr", "0.5"])
    from vlp.config import to_dict

    assert from_dict(PretrainConfig, to_dict(cfg)) == cfg


def test_auto_logit_bias_is_the_batch_prior_resolved_from_the_global_batch():
    from vlp.config import batch_prior_logit_bias

    cfg = parse_cli(PretrainConfig, ["--loss.init_logit_bias", "auto"], PRETRAIN_ALIASES)
    assert cfg.loss.init_logit_bias == "auto"
    with pytest.raises(ConfigError, match="resolved from the global batch"):
        _ = cfg.loss.resolved_init_logit_bias
    cfg.loss.resolve_auto(64)
    assert not cfg.loss.bias_is_auto
    b = cfg.loss.resolved_init_logit_bias
    assert b == pytest.approx(-math.log(63)) and 1 / (1 + math.exp(-b)) == pytest.approx(1 / 64)
    assert batch_prior_logit_bias(22027) == pytest.approx(-10.0, abs=1e-4)  # the fixed -10's batch
    assert from_dict(PretrainConfig, {"loss": {"init_logit_bias": "auto"}}).loss.init_logit_bias == "auto"
    with pytest.raises(ConfigError, match="at least 2"):
        batch_prior_logit_bias(1)


def test_auto_logit_scale_is_minus_the_auto_bias_resolved_from_the_global_batch():
    from vlp.config import batch_prior_logit_bias, batch_prior_logit_scale

    cfg = parse(["--loss.init_logit_scale", "auto"])
    assert cfg.loss.init_logit_scale == "auto" and cfg.loss.scale_is_auto
    with pytest.raises(ConfigError, match="init_logit_scale=auto is resolved from the global batch"):
        _ = cfg.loss.resolved_init_logit_scale
    cfg.loss.resolve_auto(256)
    assert not cfg.loss.scale_is_auto
    t, b = math.exp(cfg.loss.resolved_init_logit_scale), cfg.loss.init_logit_bias
    assert t == pytest.approx(math.log(255)) and t + b == pytest.approx(0.0)  # cosine 1: probability 1/2
    assert math.exp(batch_prior_logit_scale(22027)) == pytest.approx(10.0, abs=1e-4)  # the SigLIP paper's t and b
    assert batch_prior_logit_scale(22027) == pytest.approx(math.log(-batch_prior_logit_bias(22027)))
    assert batch_prior_logit_scale(3) == 0.0 and batch_prior_logit_scale(2) == 0.0  # t >= 1
    with pytest.raises(ConfigError, match="at least 2"):
        batch_prior_logit_scale(1)
    fixed = parse(["--loss.init_logit_scale", "1.5"])
    fixed.loss.resolve_auto(256)
    assert fixed.loss.init_logit_scale == 1.5 and not fixed.loss.scale_is_auto
    with pytest.raises(ConfigError, match="clip has no bias"):
        parse(["--loss", "clip", "--loss.init_logit_scale", "auto"])
    clip = parse(["--loss", "clip", "--batch-size", "256"])
    clip.loss.resolve_auto(256)
    assert clip.loss.init_logit_scale is None and clip.loss.resolved_init_logit_scale == pytest.approx(
        math.log(1 / 0.07)
    )


def test_siglip_bias_defaults_to_auto_and_a_number_is_kept():
    default = parse([])  # --loss siglip is the default loss
    assert default.loss.init_logit_bias is None and default.loss.bias_is_auto
    # built outside training (to load weights into): the unresolved default is the paper's -10
    assert default.loss.resolved_init_logit_bias == -10.0
    default.loss.resolve_auto(256)
    assert default.loss.init_logit_bias == pytest.approx(-math.log(255))
    fixed = parse(["--loss.init_logit_bias", "-10"])
    assert not fixed.loss.bias_is_auto
    fixed.loss.resolve_auto(256)
    assert fixed.loss.init_logit_bias == -10.0
    clip = parse(["--loss", "clip"])
    assert not clip.loss.bias_is_auto and clip.loss.resolved_init_logit_bias is None
    clip.loss.resolve_auto(256)
    assert clip.loss.init_logit_bias is None
