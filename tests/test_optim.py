"""AdamW groups, the fused kernel against the multi-tensor reference, and the warmup-then-cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch

from vlp.config import ConfigError, LossConfig, OptimConfig
from vlp.model import build_model, load_preset
from vlp.train.optim import build_optimizer, param_groups, warmup_cosine


def _model():
    torch.manual_seed(0)
    return build_model(load_preset("tiny-resnet"), LossConfig(name="siglip"))


def test_no_weight_decay_on_biases_norms_scalars_and_positional_tables():
    model = _model()
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {"clip.logit_scale", "clip.logit_bias", "clip.positional_embedding"} <= exempt
    assert all(p.ndim >= 2 for p in decay["params"])
    assert any(n.endswith(".bias") for n in exempt) and any("ln_final" in n for n in exempt)
    assert len(decay["params"]) + len(no_decay["params"]) == sum(1 for _ in model.parameters())


def test_fused_adamw_equals_the_multi_tensor_reference():
    """Five steps on the same gradients: the fused kernel (the default on CPU) gives the foreach path's weights.

    Both optimisers see identical gradients at every step: fed each its own model's backward, Adam's per-element
    normalisation turns float32 noise in near-zero gradient components into lr-sized differences.
    """
    models, opts = [], []
    for fused in (True, False):
        m = _model()
        models.append(m)
        opts.append(build_optimizer(m, OptimConfig(lr=1e-2, fused=fused)))
    assert opts[0].defaults["fused"] and not opts[1].defaults["fused"]
    assert build_optimizer(models[0], OptimConfig()).defaults["fused"]  # auto: on, every parameter is on the CPU
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        for p, q in zip(models[0].parameters(), models[1].parameters()):
            p.grad = torch.randn(p.shape, generator=g) * 10 ** float(torch.empty(()).uniform_(-4, 0, generator=g))
            q.grad = p.grad.clone()
        for opt in opts:
            opt.step()
    worst = max(
        ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
        for a, b in zip(models[0].parameters(), models[1].parameters())
    )
    moved = max((a - b).abs().max().item() for a, b in zip(models[1].parameters(), _model().parameters()))
    assert worst < 1e-5 and moved > 1e-2


class _ComplexParams(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3, 3, dtype=torch.complex64))


def test_fused_refused_where_unsupported():
    with pytest.raises(ConfigError, match="optim.fused=true"):
        build_optimizer(_ComplexParams(), OptimConfig(fused=True))
    assert not build_optimizer(_ComplexParams(), OptimConfig()).defaults["fused"]  # auto: falls back


def test_warmup_then_cosine_values():
    assert warmup_cosine(0, 10, 110) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 110) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 110) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110) == pytest.approx(0.5)
    assert warmup_cosine(110, 10, 110) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(110, 10, 110, min_ratio=0.1) == pytest.approx(0.1)
    assert warmup_cosine(35, 10, 110) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))


def test_lr_scales_give_named_parameters_a_group_at_a_multiple_of_the_rate():
    """{"logit_bias": 25}: the bias alone in a third group (no weight decay) at 25 x lr, kept by the schedule; its
    first Adam step is 25 times the temperature's (both move by their group's lr times the gradient's sign)."""
    model = _model()
    groups = param_groups(model, 0.1, {"logit_bias": 25.0})
    names = {id(p): n for n, p in model.named_parameters()}
    assert [[names[id(p)] for p in g["params"]] for g in groups[2:]] == [["clip.logit_bias"]]
    assert groups[2]["weight_decay"] == 0.0 and groups[2]["lr_scale"] == 25.0
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped)) and set(grouped) == {id(p) for p in model.parameters()}
    opt = build_optimizer(model, OptimConfig(lr=1e-3), {"logit_bias": 25.0})
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 1e-3, 25e-3])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, 10, 100))
    assert sched.get_last_lr()[2] == pytest.approx(25 * sched.get_last_lr()[0])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "logit" in n}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    moved = {n: (p.detach() - before[n]).abs().item() for n, p in model.named_parameters() if "logit" in n}
    lr0 = 1e-3 * warmup_cosine(0, 10, 100)
    assert moved["clip.logit_scale"] == pytest.approx(lr0, rel=1e-2)
    assert moved["clip.logit_bias"] == pytest.approx(25 * lr0, rel=1e-2)


def test_bias_lr_scale_defaults_and_errors():
    """siglip's bias trains at 25 x lr by default; clip has no bias to scale; the multiplier must be positive."""
    assert LossConfig(name="siglip").resolved_bias_lr_scale == 25.0
    assert LossConfig(name="siglip", bias_lr_scale=1.0).resolved_bias_lr_scale == 1.0
    assert LossConfig(name="clip").resolved_bias_lr_scale == 1.0
    with pytest.raises(ConfigError, match="clip has no bias"):
        LossConfig(name="clip", bias_lr_scale=25.0)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ConfigError, match="finite number > 0"):
            LossConfig(name="siglip", bias_lr_scale=bad)


def test_temperature_lr_scale_defaults_and_errors():
    """siglip's log temperature trains at 25 x lr by default, clip's at 1 x (it may be set); the multiplier must be
    positive and finite."""
    assert LossConfig(name="siglip").resolved_temperature_lr_scale == 25.0
    assert LossConfig(name="siglip", temperature_lr_scale=1.0).resolved_temperature_lr_scale == 1.0
    assert LossConfig(name="clip").resolved_temperature_lr_scale == 1.0
    assert LossConfig(name="clip", temperature_lr_scale=4.0).resolved_temperature_lr_scale == 4.0
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ConfigError, match="finite number > 0"):
            LossConfig(name="siglip", temperature_lr_scale=bad)
    for bad in (0.0, -1e-3, float("nan")):
        with pytest.raises(ConfigError, match="optim.lr must be a finite number > 0"):
            OptimConfig(lr=bad)


def _run(tmp_path, name, extra, loss="siglip"):
    """A two-step run; returns how far the bias and the log temperature moved, and the config it recorded."""
    from tests.test_pretrain import small_run_args
    from vlp.checkpointing import load_trained_model
    from vlp.config import PRETRAIN_ALIASES, PretrainConfig, parse_cli
    from vlp.train.trainer import run_pretraining

    out = tmp_path / name
    args = small_run_args(tmp_path, out, steps=2) + ["--eval.zeroshot", "false", "--optim.warmup_steps", "0"]
    run_pretraining(parse_cli(PretrainConfig, args + ["--loss", loss] + extra, PRETRAIN_ALIASES))
    model, cfg = load_trained_model(out)
    moved_b = model.logit_bias.item() - cfg.loss.init_logit_bias if loss == "siglip" else None
    return moved_b, model.logit_scale.item() - cfg.loss.resolved_init_logit_scale, cfg


def test_a_run_trains_the_bias_and_temperature_at_their_multiples(tmp_path):
    """The engine builds its optimiser with the objective's multipliers: over two steps at lr 2e-3 a scalar moves
    by about 2 x 2e-3 x its multiplier (Adam's first steps move a parameter by its lr times the gradient's sign):
    by default (25 x) both move by more than 1 x can, 1000 x moves the bias further still, and at 1 x each stays
    within 1 x's reach."""
    lr = ["--lr", "2e-3"]
    fast_b, default_t, _ = _run(tmp_path, "fast", lr + ["--loss.bias_lr_scale", "1000"])
    ones = ["--loss.bias_lr_scale", "1", "--loss.temperature_lr_scale", "1"]
    plain_b, plain_t, _ = _run(tmp_path, "plain", lr + ones)
    assert abs(plain_b) < 3 * 2 * 2e-3 and abs(fast_b) > 100 * 2e-3
    assert abs(plain_t) < 3 * 2 * 2e-3 and abs(default_t) > 10 * 2 * 2e-3


def test_the_learning_rate_defaults_to_the_objectives(tmp_path):
    """An unset --lr resolves to the objective's rate when training starts and config.yaml records it (siglip 3e-3,
    clip vlp.config.DEFAULT_LR = 2e-3); a given --lr is kept. config.yaml records the scalars' multipliers too (the
    loss's defaults where unset; clip has no bias)."""
    from vlp.config import DEFAULT_LR

    assert OptimConfig().lr is None and OptimConfig().resolved_lr == DEFAULT_LR == 2e-3
    siglip = _run(tmp_path, "siglip", [])[2]
    assert siglip.optim.lr == 3e-3
    assert (siglip.loss.bias_lr_scale, siglip.loss.temperature_lr_scale) == (25.0, 25.0)
    clip = _run(tmp_path, "clip", [], loss="clip")[2]
    assert clip.optim.lr == DEFAULT_LR
    assert (clip.loss.bias_lr_scale, clip.loss.temperature_lr_scale) == (None, 1.0)
    given = _run(tmp_path, "given", ["--lr", "1e-4", "--loss.temperature_lr_scale", "3"])[2]
    assert (given.optim.lr, given.loss.temperature_lr_scale) == (1e-4, 3.0)


def test_resuming_with_other_optimiser_groups_says_how(tmp_path):
    """A checkpoint written with the bias and temperature in the shared groups (both multipliers 1, as before the
    options) cannot load into the default's four groups: the error names the flags that resume it; with them it
    resumes."""
    from tests.test_pretrain import small_run_args
    from vlp.config import PRETRAIN_ALIASES, PretrainConfig, parse_cli
    from vlp.train.trainer import run_pretraining

    out = tmp_path / "run"
    args = small_run_args(tmp_path, out, steps=2) + ["--eval.zeroshot", "false", "--checkpoint-every", "1"]
    old = ["--loss.bias_lr_scale", "1", "--loss.temperature_lr_scale", "1"]
    run_pretraining(parse_cli(PretrainConfig, args + old, PRETRAIN_ALIASES))
    resume = small_run_args(tmp_path, out, steps=3) + ["--eval.zeroshot", "false", "--resume", "latest"]
    with pytest.raises(ConfigError, match=r"\[1.0, 1.0\] x lr, this run's at \[1.0, 1.0, 25.0, 25.0\] x lr"):
        run_pretraining(parse_cli(PretrainConfig, resume, PRETRAIN_ALIASES))
    with pytest.raises(ConfigError, match="--loss.bias_lr_scale and --loss.temperature_lr_scale"):
        run_pretraining(parse_cli(PretrainConfig, resume + ["--loss.bias_lr_scale", "1"], PRETRAIN_ALIASES))
    run_pretraining(parse_cli(PretrainConfig, resume + old, PRETRAIN_ALIASES))
