"""entroprl.integrations.trl against TRL's own GRPOTrainer (runs in .venv-trl: scripts/test.sh)."""

import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.trl
pytest.importorskip(
    "trl",
    reason="TRL is not installed in this environment; scripts/test.sh runs these in .venv-trl",
)

from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from entroprl import cli  # noqa: E402
from entroprl.algos import losses  # noqa: E402
from entroprl.algos.advantages import passk_advantages, qae_advantages  # noqa: E402
from entroprl.integrations.trl import (  # noqa: E402
    CovGRPOConfig,
    CovGRPOTrainer,
    loss_mask,
    token_advantages,
)
from entroprl.train import distributed  # noqa: E402
from tests.policies import make_tiny_policy  # noqa: E402

PROMPTS = ["1+2=", "3*4=", "5-1=", "7+7=", "2*2=", "9-3=", "8+1=", "6*0="]
WIDE = {"clip_cov_lb": -100.0, "clip_cov_ub": 100.0}  # every unclipped token is a candidate


def reward(completions, **kwargs):
    return [c.count("1") + 0.1 * len(c) for c in completions]


def make_trainer(tmp_path, config_cls=CovGRPOConfig, trainer_cls=CovGRPOTrainer, **settings):
    model, tok = make_tiny_policy()
    args = config_cls(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        seed=0,
        **settings,
    )
    return trainer_cls(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=tok,
    )


def make_inputs(trainer, seed: int, rows: int = 4, length: int = 6) -> dict:
    """A micro-batch as TRL buffers it, off-policy: old log-probs 0.3 nats of noise away."""
    g = torch.Generator().manual_seed(seed)
    vocab = trainer.model.config.vocab_size
    completion_mask = torch.ones(rows, length, dtype=torch.long)
    completion_mask[0, 4:] = 0
    completion_mask[2, 2:] = 0
    inputs = {
        "prompt_ids": torch.randint(4, vocab, (rows, 3), generator=g),
        "prompt_mask": torch.ones(rows, 3, dtype=torch.long),
        "completion_ids": torch.randint(4, vocab, (rows, length), generator=g),
        "completion_mask": completion_mask,
        "advantages": torch.randn(rows, generator=g),
        "num_items_in_batch": completion_mask.sum(),
    }
    with torch.no_grad():
        logps = trainer._policy_logps(trainer.model, inputs)
    inputs["old_per_token_logps"] = logps + 0.3 * torch.randn(logps.shape, generator=g)
    return inputs


def loss_and_grads(trainer, inputs, steps: int = 2):
    trainer.model.train()
    trainer.model.zero_grad()
    trainer.current_gradient_accumulation_steps = steps
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in trainer.model.parameters()]


def assert_same(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-7)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("base", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("loss_type", ["clip_cov", "kl_cov"])
def test_control_off_equals_trl_loss_type(tmp_path, loss_type, base):
    """Ratio 0: Clip-Cov is TRL's own loss type; KL-Cov is it with clipping off (no penalty)."""
    ours = make_trainer(
        tmp_path,
        loss_type=loss_type,
        cov_base_loss_type=base,
        clip_cov_ratio=0.0,
        kl_cov_ratio=0.0,
        gradient_accumulation_steps=2,
    )
    unclipped = {"epsilon": math.inf, "epsilon_high": math.inf} if loss_type == "kl_cov" else {}
    theirs = make_trainer(
        tmp_path,
        GRPOConfig,
        GRPOTrainer,
        loss_type=base,
        gradient_accumulation_steps=2,
        **unclipped,
    )
    inputs = make_inputs(ours, seed=1)
    assert_same(loss_and_grads(ours, inputs), loss_and_grads(theirs, inputs))


def base_aggregation(base, mask, inputs, steps, max_length):
    """TRL 1.16's aggregation of each base loss type, written as entroprl's."""
    rows, tokens = mask.shape[0], int(mask.sum())
    if base == "grpo":
        return "seq-mean-token-mean", losses.LossDenominators(tokens, rows * steps)
    if base == "bnpo":
        return "token-mean", losses.LossDenominators(tokens * steps, rows)
    if base == "dr_grpo":
        return "seq-mean-token-sum-norm", losses.LossDenominators(
            tokens, rows, rows * max_length * steps
        )
    # dapo, one process, steps_per_generation = gradient_accumulation_steps
    items = float(inputs["num_items_in_batch"])
    return "seq-mean-token-sum-norm", losses.LossDenominators(tokens, rows, items)


@pytest.mark.parametrize("base", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("loss_type", ["clip_cov", "kl_cov"])
def test_control_equals_entroprl_loss(tmp_path, loss_type, base):
    """With tokens selected, the trainer's loss and gradient are entroprl's Clip-Cov / KL-Cov."""
    trainer = make_trainer(
        tmp_path,
        loss_type=loss_type,
        cov_base_loss_type=base,
        clip_cov_ratio=0.3,
        kl_cov_ratio=0.3,
        kl_cov_coef=2.0,
        gradient_accumulation_steps=2,
        **WIDE,
    )
    reference = make_trainer(tmp_path, gradient_accumulation_steps=2)  # same initial weights
    first, second = make_inputs(trainer, seed=2), make_inputs(trainer, seed=3)
    trainer._buffered_inputs, trainer._step = [first, second], 0
    ours = loss_and_grads(trainer, first)
    with torch.no_grad():
        logps = [trainer._policy_logps(trainer.model, x) for x in (first, second)]
    step_selection = trainer.select_tokens(
        torch.cat(logps),
        torch.cat([x["old_per_token_logps"] for x in (first, second)]),
        torch.cat([token_advantages(x) for x in (first, second)]),
        torch.cat([loss_mask(x) for x in (first, second)]),
        first_step=0,
    )
    selected = step_selection[: first["completion_ids"].shape[0]]
    assert 0 < int(selected.sum()) < int(loss_mask(first).sum())

    reference.model.train()
    reference.model.zero_grad()
    logp = reference._policy_logps(reference.model, first)
    mask = loss_mask(first)
    mode, denominators = base_aggregation(base, mask, first, 2, 8)
    common = {"loss_agg_mode": mode, "selected": selected, "denominators": denominators}
    old, adv = first["old_per_token_logps"], token_advantages(first)
    if loss_type == "clip_cov":
        expected, _ = losses.clip_cov_loss(logp, old, adv, mask, **common)
    else:
        expected, _ = losses.kl_cov_loss(logp, old, adv, mask, coef=2.0, **common)
    expected.backward()
    assert_same(ours, (expected.detach(), [p.grad.clone() for p in reference.model.parameters()]))


@pytest.mark.parametrize("loss_type", ["clip_cov", "kl_cov"])
def test_selection_spans_the_optimizer_step(tmp_path, loss_type):
    """The selection is entroprl's, made once over all micro-batches of an optimizer step."""
    trainer = make_trainer(
        tmp_path,
        loss_type=loss_type,
        clip_cov_ratio=0.2,
        kl_cov_ratio=0.2,
        gradient_accumulation_steps=2,
        **WIDE,
    )
    parts = [make_inputs(trainer, seed=s) for s in (4, 5)]
    trainer._buffered_inputs, trainer._step = parts, 0
    trainer.current_gradient_accumulation_steps = 2  # as the training loop sets it
    trainer.model.train()
    first = trainer._step_selection(trainer.model)
    trainer._step = 1
    second = trainer._step_selection(trainer.model)
    with torch.no_grad():
        logp = torch.cat([trainer._policy_logps(trainer.model, x) for x in parts])
    old = torch.cat([x["old_per_token_logps"] for x in parts])
    adv = torch.cat([token_advantages(x) for x in parts])
    mask = torch.cat([loss_mask(x) for x in parts])
    if loss_type == "clip_cov":
        expected = losses.clip_cov_select(
            logp,
            old,
            adv,
            mask,
            ratio=0.2,
            clip_low=0.2,
            clip_high=0.2,
            generator=torch.Generator().manual_seed(0),
            **{k.removeprefix("clip_cov_"): v for k, v in WIDE.items()},
        )
    else:
        expected = losses.kl_cov_select(logp, adv, mask, ratio=0.2)
    torch.testing.assert_close(torch.cat([first, second]), expected)
    # per micro-batch, KL-Cov's top-k would differ from the step's
    if loss_type == "kl_cov":
        alone = losses.kl_cov_select(logp[:4], adv[:4], mask[:4], ratio=0.2)
        assert not torch.equal(alone, first)


@pytest.mark.parametrize("loss_type", ["clip_cov", "kl_cov"])
def test_selection_follows_a_short_last_window(tmp_path, loss_type):
    """Three micro-batches an epoch (one generation batch of steps_per_generation=3) and
    gradient_accumulation_steps=2: each epoch's last optimizer step accumulates one micro-batch,
    and the next epoch's windows start afresh. Every selection scope is one optimizer step's
    micro-batches (within one generation batch), never two steps'."""
    from transformers import TrainerCallback

    boundaries = []  # micro-batches done at each optimizer step

    class Boundaries(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            boundaries.append(trainer._step)

    model, tok = make_tiny_policy()
    args = CovGRPOConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        num_generations=2,
        max_completion_length=6,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        seed=0,
        gradient_accumulation_steps=2,
        steps_per_generation=3,
        num_train_epochs=2,
        save_strategy="no",
        loss_type=loss_type,
        clip_cov_ratio=0.2,
        kl_cov_ratio=0.2,
        **WIDE,
    )
    trainer = CovGRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS[:3]}),
        processing_class=tok,
        callbacks=[Boundaries()],
    )
    scopes = []
    select = trainer._select
    trainer._select = lambda model, steps: (scopes.append(list(steps)), select(model, steps))[1]
    trainer.train()
    assert boundaries == [2, 3, 5, 6]  # windows [0, 1], [2] | [3, 4], [5]
    assert scopes == [[0, 1], [2], [3, 4], [5]]


def _rank_selection(rank, world, port, out_dir):
    """One of `world` data-parallel ranks (accelerate's own process group, gloo on CPU): its two
    micro-batches of an optimizer step, and the selections each loss type makes for them."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    out = {}
    for loss_type in ("clip_cov", "kl_cov"):
        trainer = make_trainer(
            Path(out_dir) / f"rank{rank}",
            loss_type=loss_type,
            clip_cov_ratio=0.2,
            kl_cov_ratio=0.2,
            gradient_accumulation_steps=2,
            **WIDE,
        )
        assert trainer.accelerator.num_processes == world
        parts = [make_inputs(trainer, seed=20 + 2 * rank + i) for i in range(2)]
        trainer._buffered_inputs, trainer._step = parts, 0
        trainer.current_gradient_accumulation_steps = 2  # as the training loop sets it
        trainer.model.train()
        selected = [trainer._step_selection(trainer.model)]
        trainer._step = 1
        selected.append(trainer._step_selection(trainer.model))
        out[loss_type] = {"parts": parts, "selected": selected}
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    distributed.shutdown()  # every rank at once: see distributed.shutdown


@pytest.mark.distributed
def test_selection_is_global_over_data_parallel_ranks(tmp_path):
    """Two ranks select as one process over all four micro-batches of the step (rank order)."""
    world = 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_selection, args=(world, port, str(tmp_path)), nprocs=world)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    trainer = make_trainer(tmp_path, gradient_accumulation_steps=2)  # the same initial weights
    trainer.model.train()
    for loss_type in ("clip_cov", "kl_cov"):
        ranks = [r[loss_type] for r in results]
        parts = [part for r in ranks for part in r["parts"]]
        with torch.no_grad():
            logp = torch.cat([trainer._policy_logps(trainer.model, x) for x in parts])
        adv = torch.cat([token_advantages(x) for x in parts])
        mask = torch.cat([loss_mask(x) for x in parts])
        if loss_type == "clip_cov":
            expected = losses.clip_cov_select(
                logp,
                torch.cat([x["old_per_token_logps"] for x in parts]),
                adv,
                mask,
                ratio=0.2,
                generator=torch.Generator().manual_seed(0),
                **{k.removeprefix("clip_cov_"): v for k, v in WIDE.items()},
            )
        else:
            expected = losses.kl_cov_select(logp, adv, mask, ratio=0.2)
        selected = torch.cat([s for r in ranks for s in r["selected"]])
        torch.testing.assert_close(selected, expected)


def test_kl_cov_where_it_cannot_act_says_so_in_one_line(tmp_path, caplog):
    """With TRL's defaults every optimizer step is on-policy: KL-Cov's penalty |logp - old_logp|
    is 0 there, which the trainer says at start-up in one line naming the settings that make it
    act; the documented diff's setting does not trigger it."""
    caplog.set_level("WARNING", logger="entroprl.integrations.trl")
    make_trainer(tmp_path, loss_type="kl_cov", gradient_accumulation_steps=2)
    said = [r.getMessage() for r in caplog.records if "plain policy gradient" in r.getMessage()]
    assert len(said) == 1 and "\n" not in said[0] and "steps_per_generation" in said[0]
    caplog.clear()
    make_trainer(tmp_path, loss_type="kl_cov", steps_per_generation=4)  # the documented diff
    make_trainer(tmp_path, loss_type="kl_cov", gradient_accumulation_steps=2, num_iterations=2)
    assert not [r for r in caplog.records if "plain policy gradient" in r.getMessage()]


def test_cov_defaults_are_entroprls():
    """One source of defaults: the plug-in's are the trainer's settings dataclasses'."""
    args = CovGRPOConfig(output_dir="unused", use_cpu=True, report_to="none")
    clip, kl = losses.ClipCovSettings(), losses.KLCovSettings()
    assert (args.clip_cov_ratio, args.clip_cov_lb, args.clip_cov_ub) == (
        clip.ratio,
        clip.lb,
        clip.ub,
    )
    assert (args.kl_cov_ratio, args.kl_cov_coef) == (kl.ratio, kl.coef)


def test_config_checks(tmp_path):
    with pytest.raises(ValueError, match="cov_base_loss_type"):
        CovGRPOConfig(output_dir=str(tmp_path), use_cpu=True, cov_base_loss_type="sapo")
    with pytest.raises(ValueError, match="importance_sampling_level='token'"):
        CovGRPOConfig(
            output_dir=str(tmp_path),
            use_cpu=True,
            loss_type="clip_cov",
            importance_sampling_level="sequence",
        )
    with pytest.raises(TypeError, match="CovGRPOConfig"):
        make_trainer(tmp_path, GRPOConfig)


@pytest.mark.parametrize("loss_type", ["clip_cov", "kl_cov"])
def test_training_logs_reach_trainer_state_and_analyze(tmp_path, loss_type):
    """A few steps; the diagnostics land in trainer_state.json and in analyze's covariance table."""
    trainer = make_trainer(
        tmp_path,
        loss_type=loss_type,
        clip_cov_ratio=0.2,
        kl_cov_ratio=0.2,
        gradient_accumulation_steps=2,
        num_iterations=2,
        max_steps=4,
        logging_steps=1,
        save_strategy="steps",
        save_steps=4,
        **WIDE,
    )
    trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-4"
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    steps = [h for h in history if "loss" in h]
    assert len(steps) == 4
    for h in steps:
        for key in ("cov/all", "cov/top_2%", "dynamics/predicted_entropy_change"):
            assert math.isfinite(h[key]), key
        assert h["dynamics/predicted_entropy_change"] == pytest.approx(-h["cov/all"])
        assert h["entropy_seq_mean"] > 0
        assert 0 < h[f"{loss_type}_frac"] <= 0.2
    if loss_type == "kl_cov":  # on-policy on each generation's first step, off on its second
        assert steps[0]["kl_cov_abs_diff"] == 0 and steps[1]["kl_cov_abs_diff"] > 0

    cli.main(["analyze", str(checkpoint), "--out", str(tmp_path / "analysis")])
    analysis = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
    assert "covariance" not in analysis["omitted"]
    table = {row["group"]: row for row in analysis["covariance_table"]}
    assert table["all"]["n"] == 4
    assert table["all"]["mean"] == pytest.approx(sum(h["cov/all"] for h in steps) / 4)
    assert analysis["run"]["keys"]["entropy"] == "entropy_seq_mean"


# -- CE-GPPO and the advantage estimators (algorithms.md §4.8, §6.8, §6.9) -------------------------


@pytest.mark.parametrize("base", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_ce_gppo_equals_entroprl_loss(tmp_path, base):
    """TRL's clipped surrogate plus the correction on its clipped tokens is entroprl's CE-GPPO
    (without dual clip, which TRL does not have), loss and gradient, in every base aggregation;
    with both betas 1 the loss value is TRL's own."""
    settings = {"gradient_accumulation_steps": 2, "epsilon_high": 0.1}
    trainer = make_trainer(
        tmp_path,
        loss_type="ce_gppo",
        cov_base_loss_type=base,
        ce_gppo_beta1=0.5,
        ce_gppo_beta2=1.5,
        **settings,
    )
    reference = make_trainer(tmp_path, **settings)  # same initial weights
    inputs = make_inputs(trainer, seed=4)
    ours = loss_and_grads(trainer, inputs)
    reference.model.train()
    reference.model.zero_grad()
    logp = reference._policy_logps(reference.model, inputs)
    mask = loss_mask(inputs)
    mode, denominators = base_aggregation(base, mask, inputs, 2, 8)
    expected, metrics = losses.ce_gppo_loss(
        logp,
        inputs["old_per_token_logps"],
        token_advantages(inputs),
        mask,
        clip_low=0.2,
        clip_high=0.1,
        clip_ratio_c=1e9,
        beta1=0.5,
        beta2=1.5,
        loss_agg_mode=mode,
        denominators=denominators,
    )
    assert metrics["ce_gppo_low_frac"] > 0 and metrics["ce_gppo_high_frac"] > 0
    expected.backward()
    assert_same(ours, (expected.detach(), [p.grad.clone() for p in reference.model.parameters()]))
    ones = make_trainer(
        tmp_path, loss_type="ce_gppo", cov_base_loss_type=base, ce_gppo_beta1=1.0, **settings
    )
    theirs = make_trainer(tmp_path, GRPOConfig, GRPOTrainer, loss_type=base, **settings)
    torch.testing.assert_close(
        loss_and_grads(ones, inputs)[0], loss_and_grads(theirs, inputs)[0], rtol=1e-6, atol=1e-8
    )


def binary_reward(completions, **kwargs):
    return [float("1" in c) for c in completions]


@pytest.mark.parametrize("estimator", ["qae", "passk"])
def test_advantage_estimators_replace_trls(tmp_path, estimator):
    """One step: the advantages the loss receives are entroprl's, from TRL's rewards, per group
    of num_generations."""
    model, tok = make_tiny_policy()
    args = CovGRPOConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=8,
        report_to="none",
        use_cpu=True,
        seed=0,
        max_steps=1,
        advantage_estimator=estimator,
        qae_quantile=0.25,
        pass_k=2,
    )
    trainer = CovGRPOTrainer(
        model=model,
        reward_funcs=binary_reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=tok,
    )
    seen = []
    real = trainer._generate_and_score_completions

    def capture(inputs):
        output = real(inputs)
        seen.append((trainer._rewards_per_func[:, 0].clone(), output["advantages"].clone()))
        return output

    trainer._generate_and_score_completions = capture
    trainer.train()
    rewards, advantages = seen[0]
    groups = torch.arange(8) // 4
    if estimator == "qae":
        expected = qae_advantages(rewards, groups, quantile=0.25)
    else:
        expected = passk_advantages(rewards, groups, k=2)
    torch.testing.assert_close(advantages, expected)
    with pytest.raises(ValueError, match="multi_objective_aggregation"):
        CovGRPOConfig(
            output_dir=str(tmp_path),
            use_cpu=True,
            advantage_estimator="qae",
            multi_objective_aggregation="normalize_then_sum",
        )
    with pytest.raises(ValueError, match="advantage_estimator"):
        CovGRPOConfig(output_dir=str(tmp_path), use_cpu=True, advantage_estimator="rloo")
