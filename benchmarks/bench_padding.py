"""Right padding not computed (`forward.response_columns`) on the no-grad log-prob pass and on one
update, against every forward running over all response columns (the behaviour before).

    python benchmarks/bench_padding.py [--hidden 256] [--layers 4] [--rows 64] [--response 256]
        [--micro-batch 16] [--repeats 3]

One batch of `rows` random prompts of 32 tokens with random responses whose lengths are drawn
uniformly from 1/8 to all of `--response` tokens (one row of full length: the batch is padded to
it), as a policy's responses vary. The model is a random-init Qwen2 (head_dim 32) with Qwen2.5's
151,936-token vocabulary. "no-grad" is `batched_log_probs`, `--micro-batch` rows at a time (the
rows sorted by length, each micro-batch computed up to its longest); "update" is `update_policy`
with micro-batches of `--micro-batch` rows in the shuffled order, one mini-batch. Times are the
median of `--repeats` calls after one warm-up call, on 2 torch threads; prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
from types import SimpleNamespace
from unittest import mock

import torch
from _common import timed
from transformers import Qwen2Config, Qwen2ForCausalLM

from entroprl.config import config_from_dict
from entroprl.demo.models import QWEN25_05B
from entroprl.train import forward
from entroprl.train.micro_batches import Budget
from entroprl.train.update import UpdateBatch, update_policy


def make_batch(rows: int, R: int, vocab: int) -> UpdateBatch:
    g = torch.Generator().manual_seed(0)
    P = 32
    lengths = torch.randint(R // 8, R + 1, (rows,), generator=g)
    lengths[0] = R
    mask = (torch.arange(R) < lengths[:, None]).float()
    ids = torch.randint(3, vocab, (rows, P + R), generator=g)
    attention = torch.cat([torch.ones(rows, P, dtype=torch.long), mask.long()], dim=1)
    return UpdateBatch(
        input_ids=ids,
        attention_mask=attention,
        response_mask=mask,
        old_log_prob=-torch.rand(rows, R, generator=g) * mask,
        advantages=torch.randn(rows, 1, generator=g).expand(rows, R) * mask,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--response", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    shape = QWEN25_05B | {
        "hidden_size": args.hidden,
        "intermediate_size": 2 * args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.hidden // 32,
        "num_key_value_heads": args.hidden // 64,
    }
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**shape))
    batch = make_batch(args.rows, args.response, shape["vocab_size"])
    config = config_from_dict(
        {
            "optim": {"mini_batch_size": args.rows, "micro_batch_size": args.micro_batch},
            "rollout": {"max_new_tokens": args.response},
        }
    )
    rows = SimpleNamespace(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        response_mask=batch.response_mask,
    )

    def no_grad():
        forward.batched_log_probs(model, rows, Budget(args.micro_batch), 1.0)

    def update():
        trained = copy.deepcopy(model)
        optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-6)
        update_policy(trained, optimizer, batch, config, generator=torch.Generator())

    def all_columns(lengths, response_len):  # the behaviour before
        return response_len

    lengths = batch.response_mask.sum(dim=1)
    print(
        f"hidden {args.hidden}, {args.layers} layers, vocabulary {shape['vocab_size']}; "
        f"{args.rows} rows of prompt 32 + responses of {int(lengths.min())} to {args.response} "
        f"tokens (mean {lengths.mean():.0f}); micro-batches of {args.micro_batch}\n"
    )
    print("| pass | all columns s | up to the longest s | speedup |\n|---|---:|---:|---:|")
    for name, fn in (("no-grad", no_grad), ("update", update)):
        with mock.patch.object(forward, "response_columns", all_columns):
            before = timed(fn, args.repeats)
        after = timed(fn, args.repeats)
        print(f"| {name} | {before:.2f} | {after:.2f} | {before / after:.2f}x |")


if __name__ == "__main__":
    main()
