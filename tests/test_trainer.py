import copy
import json
import math
from dataclasses import replace

import pytest
import torch
import yaml

from entroprl.algos import losses
from entroprl.config import ConfigError, config_from_dict
from entroprl.errors import RewardError
from entroprl.rollout.batch import ScoredRollout, concat_batches, response_mask_from_ids
from entroprl.rollout.hf import HFBackend
from entroprl.tasks.base import Example, Task
from entroprl.train.forward import forward_log_probs
from entroprl.train.rundir import read_metrics
from entroprl.train.trainer import Trainer, TrainingError
from entroprl.train.update import UpdateBatch, update_policy
from tests import toy_loss
from tests.policies import alternating_scores, make_tiny_policy

TIMING = ("timing_s/", "perf/")


def small_config(out_dir, **sections):
    values = {
        "data": {"train_size": 64, "test_size": 8},
        "rollout": {"prompts_per_step": 4, "n": 4, "max_new_tokens": 8},
        "optim": {"lr": 1e-3, "mini_batch_size": 8, "micro_batch_size": 4},
        "trainer": {
            "steps": 3,
            "out_dir": str(out_dir),
            "eval_every": 2,
            "eval_samples": 2,
            "save_every": 2,
            "progress": False,
            "report_to": [],
        },
    }
    for section, items in sections.items():
        values.setdefault(section, {}).update(items)
    return config_from_dict(values)


def test_response_mask_stops_after_first_eos():
    ids = torch.tensor([[5, 1, 7, 1], [5, 6, 7, 8], [1, 0, 0, 0]])
    assert response_mask_from_ids(ids, eos_token_id=1).tolist() == [
        [1, 1, 0, 0],
        [1, 1, 1, 1],
        [1, 0, 0, 0],
    ]


def test_left_padded_forward_matches_unpadded(tiny_policy):
    """Training log-probs of a left-padded batch equal those of each sequence alone."""
    model, tok = tiny_policy
    prompts, responses = ["1 2>3=", "12 3 4>9="], ["1+2", "3*4-3"]
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    resp = tok(
        responses, return_tensors="pt", padding=True, add_special_tokens=False, padding_side="right"
    )
    ids = torch.cat([enc["input_ids"], resp["input_ids"]], 1)
    mask = torch.cat([enc["attention_mask"], resp["attention_mask"]], 1)
    R = resp["input_ids"].shape[1]
    logp, _ = forward_log_probs(model, ids, mask, R)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        alone = torch.tensor([tok.encode(p + r, add_special_tokens=False)])
        logits = model(alone).logits[0, len(p) - 1 : -1]
        expected = torch.log_softmax(logits, -1).gather(-1, alone[0, len(p) :, None])[:, 0]
        torch.testing.assert_close(logp[i, : len(r)], expected, atol=1e-5, rtol=1e-5)


def test_generation_is_seeded_and_masks_padding(tiny_policy):
    model, tok = tiny_policy
    backend = HFBackend(model, tok)
    torch.manual_seed(3)
    a = backend.generate(["1 2>3=", "4 5>9="], n=3, temperature=1.0, top_p=1.0, max_new_tokens=6)
    torch.manual_seed(3)
    b = backend.generate(["1 2>3=", "4 5>9="], n=3, temperature=1.0, top_p=1.0, max_new_tokens=6)
    assert torch.equal(a.input_ids, b.input_ids)
    assert a.group_ids.tolist() == [0, 0, 0, 1, 1, 1]
    assert a.response_mask.shape == (6, a.input_ids.shape[1] - 6)
    pad = a.response_ids[a.response_mask == 0]
    assert (pad == tok.pad_token_id).all()


def _scripted(trainer: Trainer) -> Trainer:
    """`trainer` with rewards that differ within each group, so that its updates move the
    weights (the untrained policy solves nothing)."""
    trainer.score = alternating_scores
    return trainer


def test_train_writes_run_directory_and_resume_matches(tiny_policy, tmp_path):
    model, tok = tiny_policy
    straight = tmp_path / "straight"
    config = small_config(straight, trainer={"steps": 4, "entropy_change_every": 2})
    _scripted(Trainer(config, model=model, tokenizer=tok)).train()
    records = read_metrics(straight / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    assert all(r["actor/grad_norm"] > 0 for r in records[1:])  # what resumes is not nothing
    for key in (
        "critic/score/mean",
        "actor/entropy",
        "actor/entropy_seq_mean",
        "actor/pg_clipfrac",
        "actor/ppo_kl",
        "actor/grad_norm",
        "actor/lr",
        "cov/top_0.2%",
        "cov/all",
        "dynamics/predicted_entropy_change",
        "response_length/mean",
        "perf/rollout_tokens_per_s",
        "timing_s/gen",
    ):
        assert key in records[1], key
    assert "val-core/countdown/acc/mean@2" in records[2]
    # measured every 2 steps
    assert ["dynamics/entropy_change" in r for r in records] == [False, False, True, False, True]
    assert (straight / "config.yaml").is_file()
    ckpt = straight / "checkpoints" / "step_000004"
    assert (ckpt / "model" / "model.safetensors").is_file()
    assert (ckpt / "optimizer.safetensors").is_file()
    assert (straight / "checkpoints" / "latest").read_text() == "step_000004"
    sample = json.loads((straight / "rollouts" / "step_000001.jsonl").read_text().splitlines()[0])
    assert len(sample["tokens"]) == len(sample["entropy"]) == len(sample["cov"])

    # The same run stopped after step 2 and resumed gives the same metrics.
    model2, tok2 = make_tiny_policy()
    resumed = tmp_path / "resumed"
    config = small_config(resumed, trainer={"steps": 2, "entropy_change_every": 2})
    _scripted(Trainer(config, model=model2, tokenizer=tok2)).train()
    model3, tok3 = make_tiny_policy()
    config = small_config(resumed, trainer={"steps": 4, "entropy_change_every": 2})
    _scripted(Trainer(config, model=model3, tokenizer=tok3)).train(resume=True)
    again = read_metrics(resumed / "metrics.jsonl")
    assert [r["step"] for r in again] == [0, 1, 2, 3, 4]
    for r1, r2 in zip(records, again, strict=True):
        for key, value in r1.items():
            if key.startswith(TIMING) or key == "actor/lr":
                continue
            assert r2[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (r1["step"], key)


def test_local_checkpoint_path_loads(tiny_policy, tmp_path):
    model, tok = tiny_policy
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    config = small_config(
        tmp_path / "run",
        model={"path": str(tmp_path / "ckpt")},
        trainer={"steps": 1, "eval_every": 0},
    )
    trainer = Trainer(config)
    torch.testing.assert_close(trainer.actor.model.state_dict(), model.state_dict())
    trainer.train()
    with pytest.raises(ConfigError, match=r"model.path=.*no config\.json"):
        Trainer(small_config(tmp_path / "r2", model={"path": str(tmp_path)}))


def test_reward_function_that_raises_is_named(tiny_policy, tmp_path):
    model, tok = tiny_policy

    def broken(completion, answer):
        raise KeyError("boom")

    task = Task("broken", [Example("1 2>3=", None)] * 4, [Example("1 2>3=", None)], broken)
    trainer = Trainer(small_config(tmp_path), task=task, model=model, tokenizer=tok)
    with pytest.raises(RewardError, match=r"reward function of task .broken. raised.*boom"):
        trainer.train()


def test_nan_loss_skips_updates_then_stops(tiny_policy, tmp_path, monkeypatch):
    model, tok = tiny_policy
    real = losses.POLICY_LOSSES["ppo"]

    def nan_loss(*args, **kwargs):
        loss, metrics = real.fn(*args, **kwargs)
        return loss * float("nan"), metrics

    monkeypatch.setitem(losses.POLICY_LOSSES, "ppo", replace(real, fn=nan_loss))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = small_config(
        tmp_path, trainer={"steps": 5, "max_nonfinite_updates": 3, "eval_every": 0}
    )
    with pytest.raises(TrainingError, match="3 steps in a row"):
        Trainer(config, model=model, tokenizer=tok).train()
    records = read_metrics(tmp_path / "metrics.jsonl")
    # two mini-batches a step, both skipped; the third step is logged, then the run stops
    assert [r["actor/skipped_updates"] for r in records] == [2, 2, 2]
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # no update touched the weights


def test_kl_cov_single_update_warns(tiny_policy, tmp_path):
    model, tok = tiny_policy
    config = small_config(
        tmp_path,
        algorithm={"policy_loss": "kl_cov"},
        optim={"mini_batch_size": 16, "micro_batch_size": 4},
    )
    with pytest.warns(UserWarning, match="KL-Cov with one mini-batch and one epoch"):
        Trainer(config, model=model, tokenizer=tok)


def _update_batch(tok, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, len(tok), (n, 12), generator=g)
    attention = torch.ones_like(ids)
    attention[: n // 2, :2] = 0  # some left padding
    ids[attention == 0] = tok.pad_token_id
    mask = torch.ones(n, 6)
    mask[1, 4:] = 0
    mask[5, 2:] = 0
    old = -torch.rand(n, 6, generator=g) * 3
    adv = torch.randn(n, 1, generator=g).expand(n, 6) * mask
    return UpdateBatch(
        input_ids=ids,
        attention_mask=attention,
        response_mask=mask,
        old_log_prob=old,
        advantages=adv.contiguous(),
    )


# Settings that make each selection pick several tokens of the small test batch; a loss not named
# here runs with its defaults.
SPLIT_TEST_SETTINGS = {
    "kl_cov": {"ratio": 0.1},
    "clip_cov": {"ratio": 0.1, "lb": -10.0, "ub": 10.0},
    "entropic": {"high_prob_threshold": 0.045},
}


def controller_kwargs(config):
    """The loss's keyword arguments as `Trainer.update` passes them when the loss keeps a
    controller (after one step at entropy 1, far from EntroPIC's target: alpha is 0.9), else
    None."""
    spec = losses.get_policy_loss(config.algorithm.policy_loss)
    if spec.controller is None:
        return None
    controller = spec.controller(config.loss_settings())
    controller.update({"token_mean": 1.0, "seq_mean_token_mean": 1.0})
    return controller.loss_kwargs()


@pytest.mark.parametrize("policy_loss", sorted(losses.POLICY_LOSSES))
@pytest.mark.parametrize("mode", losses.LOSS_AGG_MODES)
def test_update_independent_of_micro_batch_split(policy_loss, mode):
    """One optimizer step on a mini-batch gives the same weights for any micro-batch size."""
    results = []
    for micro in (8, 4, 2):
        model, tok = make_tiny_policy()
        batch = _update_batch(tok)
        config = config_from_dict(
            {
                "algorithm": {
                    "policy_loss": policy_loss,
                    "loss_agg_mode": mode,
                    "loss": SPLIT_TEST_SETTINGS,
                },
                "rollout": {"max_new_tokens": 6},
                "optim": {"lr": 1e-2, "mini_batch_size": 8, "micro_batch_size": micro, "epochs": 2},
            }
        )
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        update_policy(
            model,
            opt,
            batch,
            config,
            generator=torch.Generator().manual_seed(0),
            loss_kwargs=controller_kwargs(config),
        )
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    # AdamW divides by sqrt(v): where a gradient entry is near zero, the float rounding that
    # differs between splits moves that weight by up to ~1e-5 (an update is ~1e-2 here)
    torch.testing.assert_close(results[1], results[0], atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(results[2], results[0], atol=5e-5, rtol=1e-5)
    assert not math.isnan(results[0].sum().item())


@pytest.mark.parametrize(
    # Clip-Cov's random draw runs over the candidates in row order, which dropping rows changes
    "policy_loss",
    sorted(set(losses.POLICY_LOSSES) - {"clip_cov"}),
)
@pytest.mark.parametrize("mode", losses.LOSS_AGG_MODES)
def test_masked_out_rows_update_like_dropped_rows(policy_loss, mode):
    """Dynamic sampling masks filtered groups out of the loss: the same update as dropping them."""
    keep = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    config = config_from_dict(
        {
            "algorithm": {
                "policy_loss": policy_loss,
                "loss_agg_mode": mode,
                "loss": SPLIT_TEST_SETTINGS,
            },
            "rollout": {"max_new_tokens": 6},
            "optim": {"mini_batch_size": 8, "micro_batch_size": 4, "epochs": 1},
        }
    )
    results = []
    for variant in ("masked", "dropped"):
        model, tok = make_tiny_policy()
        batch = _update_batch(tok)
        if variant == "masked":
            batch = replace(batch, response_mask=batch.response_mask * keep[:, None])
        else:
            batch = batch.rows(keep.nonzero().squeeze(1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        update_policy(
            model,
            opt,
            batch,
            config,
            generator=torch.Generator().manual_seed(0),
            loss_kwargs=controller_kwargs(config),
        )
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(results[0], results[1], atol=1e-6, rtol=1e-5)


def test_dynamic_sampling_run(tiny_policy, tmp_path):
    """The untrained policy solves nothing: dynamic sampling filters every group out, and each
    step is skipped, weights untouched, but logged."""
    model, tok = tiny_policy
    before = copy.deepcopy(model.state_dict())
    config = small_config(
        tmp_path, algorithm={"dynamic_sampling": True}, trainer={"steps": 2, "eval_every": 0}
    )
    Trainer(config, model=model, tokenizer=tok).train()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["batch/kept_fraction"] == 0 and r["actor/skipped_updates"] == 1 for r in records)
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


def test_concat_and_rows_keep_every_row_intact(tiny_policy):
    """Rows of differently padded batches, joined and then picked, keep their tokens, their
    masks and their log-probs; groups stay apart; columns no picked row uses are dropped."""
    model, tok = tiny_policy
    backend = HFBackend(model, tok)
    torch.manual_seed(0)
    a = backend.generate(["1 2>3="], n=2, temperature=1.0, top_p=1.0, max_new_tokens=3)
    b = backend.generate(
        ["10 20 30>60=", "4>4="], n=2, temperature=1.0, top_p=1.0, max_new_tokens=7
    )
    both = concat_batches([a, b], tok.pad_token_id)
    assert both.group_ids.tolist() == [0, 0, 1, 1, 2, 2]
    assert both.texts == a.texts + b.texts
    assert both.prompt_len == max(a.prompt_len, b.prompt_len)

    def alone(batch, i):
        """Row i's prompt and response tokens, padding removed."""
        prompt = batch.input_ids[i, : batch.prompt_len][
            batch.attention_mask[i, : batch.prompt_len] == 1
        ]
        return prompt.tolist(), batch.response_ids[i][batch.response_mask[i] == 1].tolist()

    originals = [alone(a, 0), alone(a, 1), *(alone(b, i) for i in range(4))]
    assert [alone(both, i) for i in range(6)] == originals
    picked = both.rows(torch.tensor([0, 1]))  # the short prompt's group only
    assert picked.prompt_len == a.prompt_len
    assert picked.response_mask.shape[1] == int(a.response_lengths.max())
    assert [alone(picked, i) for i in range(2)] == originals[:2]
    full, _ = forward_log_probs(
        model, both.input_ids, both.attention_mask, both.response_mask.shape[1]
    )
    part, _ = forward_log_probs(
        model, picked.input_ids, picked.attention_mask, picked.response_mask.shape[1]
    )
    width = picked.response_mask.shape[1]
    torch.testing.assert_close(
        part * picked.response_mask,
        (full[:2, :width] * both.response_mask[:2, :width]),
        atol=1e-5,
        rtol=1e-5,
    )


def test_dynamic_sampling_refills_until_every_group_is_informative(tiny_policy, tmp_path):
    """Batches are drawn until the step holds prompts_per_step groups whose rewards differ, at
    most dynamic_sampling_max_batches; all-equal groups fill what is still empty; the groups kept
    stay in sampling order, and the accuracy logged is that of everything sampled."""
    model, tok = tiny_policy
    config = small_config(
        tmp_path,
        algorithm={"dynamic_sampling": True, "dynamic_sampling_max_batches": 3},
        trainer={"steps": 1, "eval_every": 0},
    )
    trainer = Trainer(config, model=model, tokenizer=tok)
    # prompts_per_step 4, n 4: per batch, groups 0-3 get these rewards
    scripted = [
        [[0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0], [0, 0, 0, 0]],  # one informative group
        [[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0]],  # two more
        [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],  # none: still one short
    ]
    seen, sampled_tokens = [], []

    def score(batch, answers):
        seen.append(batch.texts)
        sampled_tokens.append(int(batch.response_mask.sum()))
        r = torch.tensor(scripted[len(seen) - 1], dtype=torch.float32).flatten()
        return ScoredRollout(batch=batch, scores=r.clone(), rewards=r)

    trainer.score = score
    sample = trainer.sample(1)
    batch, rewards, scores = sample.scored.batch, sample.scored.rewards, sample.scored.scores
    tokens, metrics = sample.sampled_tokens, sample.metrics
    assert metrics["train/num_gen_batches"] == 3
    assert tokens == sum(sampled_tokens)  # all three batches, not only the groups kept
    assert metrics["train/acc"] == pytest.approx(torch.tensor(scripted).float().mean().item())
    want = [scripted[0][0], scripted[0][2], scripted[1][1], scripted[1][3]]
    assert rewards.tolist() == scores.tolist() == [float(x) for g in want for x in g]
    texts = [t for b in seen for t in b]
    assert batch.texts == [texts[i] for g in (0, 2, 5, 7) for i in range(4 * g, 4 * g + 4)]
    assert batch.group_ids.unique().numel() == 4
    # each batch of a step draws different prompts
    assert len({tuple(trainer.prompts_for(1, k)) for k in range(3)}) == 3
    assert trainer.prompts_for(1, 0) == trainer.prompts_for(1)

    # enough after the first batch: no refill
    seen.clear()
    scripted[0] = [[0, 1, 0, 0]] * 4
    sample = trainer.sample(1)
    rewards, metrics = sample.scored.rewards, sample.metrics
    assert metrics["train/num_gen_batches"] == 1 and len(seen) == 1
    assert rewards.tolist() == [0.0, 1.0, 0.0, 0.0] * 4


def test_dynamic_sampling_refills_in_a_run(tiny_policy, tmp_path):
    """The untrained policy solves nothing; overlong penalties make some groups' rewards
    differ (filtering on the reward, not the score), few enough that the first step needs a
    refill."""
    model, tok = tiny_policy
    config = small_config(
        tmp_path,
        algorithm={
            "dynamic_sampling": True,
            "dynamic_sampling_metric": "reward",
            "dynamic_sampling_max_batches": 3,
            "overlong_buffer": 4,
        },
        trainer={"steps": 2, "eval_every": 0},
    )
    Trainer(config, model=model, tokenizer=tok).train()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert all(1 <= r["train/num_gen_batches"] <= 3 for r in records)
    assert records[0]["train/num_gen_batches"] > 1
    assert all(r["batch/kept_fraction"] == 1.0 and r["actor/grad_norm"] > 0 for r in records)


def test_fsdp_without_a_process_group_says_how_to_launch(tiny_policy, tmp_path):
    model, tok = tiny_policy
    config = small_config(tmp_path, trainer={"strategy": "fsdp"})
    with pytest.raises(RuntimeError, match="torchrun"):
        Trainer(config, model=model, tokenizer=tok)


def test_no_grad_passes_use_their_own_micro_batch(tiny_policy, tmp_path, monkeypatch):
    """Old, reference and selection log-probs run in log_prob_micro_batch_size rows; the
    backward passes keep micro_batch_size; and the step logs what it does with the default."""
    from entroprl.train import forward

    calls = []
    real = forward.batched_log_probs

    def recording(model, batch, budget, temperature, **kwargs):
        assert budget.tokens is None  # no token budget configured
        calls.append(budget.rows)
        return real(model, batch, budget, temperature, **kwargs)

    monkeypatch.setattr(forward, "batched_log_probs", recording)
    model, tok = tiny_policy
    runs = {}
    for name, size in [("default", None), ("large", 16)]:
        config = small_config(
            tmp_path / name,
            optim={"log_prob_micro_batch_size": size},
            algorithm={"kl_coef": 0.05, "policy_loss": "clip_cov"},
            trainer={"steps": 1, "eval_every": 0, "entropy_change_every": 1},
        )
        calls.clear()
        trainer = Trainer(config, model=copy.deepcopy(model), tokenizer=tok)
        trainer.score = alternating_scores  # an update that moves the weights
        trainer.train()
        # old and reference log-probs, a selection pass for the second of the 2 mini-batches
        # (the first selects with the old log-probs: no update has moved the weights yet), and
        # the entropy after the update
        assert calls == [size or 4] * 4, name
        runs[name] = read_metrics(tmp_path / name / "metrics.jsonl")[0]
    assert runs["default"]["actor/grad_norm"] > 0 and runs["default"]["actor/kl_loss"] > 0
    for key in ("actor/entropy", "actor/kl_loss", "actor/pg_loss", "actor/grad_norm"):
        assert runs["large"][key] == pytest.approx(runs["default"][key], rel=1e-4, abs=1e-6), key


def test_a_plugin_loss_trains_from_a_yaml_config(tmp_path):
    """A loss registered outside entroprl (tests/toy_loss.py), named in a YAML config with its
    own settings, trains with no trainer change: its selection is made over the whole mini-batch
    on all ranks, and its own metrics are logged (summed over the mini-batch, as it declared)."""
    from entroprl.config import load_config

    values = {
        "algorithm": {
            "plugins": ["tests.toy_loss"],
            "policy_loss": "toy_scaled",
            "loss": {"toy_scaled": {"fraction": 0.5, "weight": 0.0}},
        },
        "data": {"train_size": 64, "test_size": 8},
        "rollout": {"prompts_per_step": 4, "n": 4, "max_new_tokens": 8},
        "optim": {"lr": 1e-3, "mini_batch_size": 8, "micro_batch_size": 4},
        "trainer": {"steps": 2, "out_dir": str(tmp_path), "eval_every": 0, "progress": False},
    }
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(values))
    config = load_config(path)
    assert config.loss_settings() == toy_loss.ToySettings(fraction=0.5, weight=0.0)
    model, tok = make_tiny_policy()
    toy_loss.SCOPES.clear()
    Trainer(config, model=model, tokenizer=tok).train()
    # two mini-batches of 8 responses per step, each selected whole, across ranks
    assert len(toy_loss.SCOPES) == 4
    assert all(shape[0] == 8 and across for shape, across in toy_loss.SCOPES)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert all(r["actor/toy_selected"] > 0 for r in records)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["algorithm"]["loss"] == {
        "toy_scaled": {"fraction": 0.5, "weight": 0.0}
    }


def test_nonfinite_logits_stop_the_run_at_once_naming_the_step(tiny_policy, tmp_path):
    """NaN logits in the log-prob passes (here from step 2 on) stop the run at that step with a
    hint, not with a bare error, and not after max_nonfinite_updates: no later update can mend the
    model that produced them."""
    model, tok = tiny_policy
    config = small_config(tmp_path, trainer={"steps": 5, "eval_every": 0, "save_every": 1})
    trainer = Trainer(config, model=model, tokenizer=tok)

    def poison(module, args, kwargs, output):
        if trainer.step >= 1 and kwargs.get("use_cache") is False:  # not in generation
            output.logits = output.logits * float("nan")
        return output

    model.register_forward_hook(poison, with_kwargs=True)
    with pytest.raises(TrainingError, match=r"step 2: logits contain NaN.*step 1.*--resume"):
        trainer.train()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_000001"


@pytest.mark.parametrize("measure", [1, 0])
def test_nonfinite_weights_stop_at_once_and_are_never_saved(tmp_path, measure):
    """An update that makes the weights NaN (an infinite learning rate at step 2) stops the run at
    that step with a hint; the checkpoint of step 1 stays the newest, and resumes."""
    model, tok = make_tiny_policy()
    config = small_config(
        tmp_path,
        trainer={"steps": 3, "save_every": 1, "eval_every": 0, "entropy_change_every": measure},
    )
    trainer = Trainer(config, model=model, tokenizer=tok)
    trainer.actor.lr_at = lambda step: math.inf if step >= 1 else 1e-3
    with pytest.raises(TrainingError, match=r"step 2\b.*weights.*optim\.lr") as caught:
        trainer.train()
    assert "step 1" in str(caught.value).split("weights", 1)[1]  # the newest checkpoint
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_000001"
    assert not (checkpoints / "step_000002").exists()
    model, tok = make_tiny_policy()
    Trainer(config, model=model, tokenizer=tok).train(resume=True)
    assert (checkpoints / "latest").read_text() == "step_000003"


def test_nonfinite_initial_weights_are_named_before_the_first_step(tmp_path):
    model, tok = make_tiny_policy()
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    config = small_config(tmp_path, trainer={"steps": 1, "eval_every": 0})
    with pytest.raises(TrainingError, match=r"step 0\b.*weights"):
        Trainer(config, model=model, tokenizer=tok).train()
    assert not (tmp_path / "checkpoints").exists()


def test_float16_weights_are_refused_for_training(tiny_policy, tmp_path):
    """float16 weights turn NaN on the first AdamW step; evaluation in float16 stays possible."""
    model, tok = tiny_policy
    config = small_config(tmp_path, model={"dtype": "float16"})
    with pytest.raises(ConfigError, match=r"model\.dtype: float16"):
        Trainer(config, model=model, tokenizer=tok)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_cuda_without_a_gpu_says_so(tiny_policy, tmp_path):
    model, tok = tiny_policy
    with pytest.raises(TrainingError, match=r"trainer\.device=cuda.*no CUDA"):
        Trainer(small_config(tmp_path, trainer={"device": "cuda"}), model=model, tokenizer=tok)


def test_loss_controller_is_logged_checkpointed_and_resumed(tmp_path):
    """EntroPIC's controller lives in the trainer through the generic hook: its alpha, error and
    integral are logged every step, saved in checkpoints and restored on resume (the resumed run
    logs what the straight one did)."""
    algorithm = {
        "policy_loss": "entropic",
        "loss": {"entropic": {"target": 0.5, "ki": 0.5, "high_prob_threshold": 0.3}},
        "advantage": "passk",
        "advantage_settings": {"passk": {"k": 2}},
    }
    runs = {}
    for name, plan in (("straight", [4]), ("resumed", [2, 4])):
        for i, steps in enumerate(plan):
            model, tok = make_tiny_policy()
            config = small_config(
                tmp_path / name,
                algorithm=algorithm,
                trainer={"steps": steps, "eval_every": 0},
                optim={"mini_batch_size": 16},  # one mini-batch: on-policy but for the controller
            )
            trainer = Trainer(config, model=model, tokenizer=tok)
            assert not trainer.on_policy
            trainer.train(resume=i > 0)
        runs[name] = read_metrics(tmp_path / name / "metrics.jsonl")
    straight = runs["straight"]
    integral = 0.0
    for record in straight:
        error = record["actor/entropy"] - 0.5  # token-mean entropy before the update
        assert record["actor/control_error"] == pytest.approx(error, abs=1e-9)
        assert record["actor/control_alpha"] == pytest.approx(
            min(max(error + 0.5 * integral, -1.0), 1.0), abs=1e-9
        )
        integral += error
        assert record["actor/control_integral"] == pytest.approx(integral, abs=1e-9)
        assert "actor/entropic_term" in record
    for r1, r2 in zip(straight, runs["resumed"], strict=True):
        for key in ("actor/control_alpha", "actor/control_integral", "actor/pg_loss"):
            assert r2[key] == pytest.approx(r1[key], rel=1e-5, abs=1e-6), (r1["step"], key)
