"""Host reads of one policy update, per registered loss, with one and with four micro-batches.

    python benchmarks/bench_host_reads.py

A host read (a tensor's `item`, `tolist`, `bool`, `int` or `float`) waits for the device to finish
every kernel queued before it: on a GPU each one stalls the update. The table counts them in one
`update_policy` call on a 16-row mini-batch of a random-init tiny Qwen2 (the demo's tokenizer, 6
response tokens), as one micro-batch of 16 rows and as four of 4; the last column is what each
further micro-batch costs. Counts, not times: the same on every machine and on the CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from _common import char_model_config

from entroprl.algos import losses
from entroprl.config import config_from_dict
from entroprl.demo.models import build_model
from entroprl.demo.tokenizer import build_char_tokenizer
from entroprl.train.update import UpdateBatch, update_policy

READS = ("item", "tolist", "__bool__", "__int__", "__float__")
ROWS, PROMPT, RESPONSE = 16, 4, 6


@contextlib.contextmanager
def counting_reads() -> Iterator[list[int]]:
    """Within: every host read is counted, in the one-item list yielded."""
    count = [0]
    real = {name: getattr(torch.Tensor, name) for name in READS}

    def counter(method):
        def counted(self, *args, **kwargs):
            count[0] += 1
            return method(self, *args, **kwargs)

        return counted

    try:
        for name, method in real.items():
            setattr(torch.Tensor, name, counter(method))
        yield count
    finally:
        for name, method in real.items():
            setattr(torch.Tensor, name, method)


def batch() -> UpdateBatch:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 20, (ROWS, PROMPT + RESPONSE), generator=g)
    mask = torch.ones(ROWS, RESPONSE)
    mask[::3, 4:] = 0
    return UpdateBatch(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        response_mask=mask,
        old_log_prob=-torch.rand(ROWS, RESPONSE, generator=g),
        advantages=torch.randn(ROWS, RESPONSE, generator=g),
    )


def reads(loss: str, micro: int, count: list[int]) -> int:
    tok = build_char_tokenizer()
    model = build_model(char_model_config(tok, 64, 2), seed=0)
    config = config_from_dict(
        {
            "algorithm": {"policy_loss": loss},
            "optim": {"mini_batch_size": ROWS, "micro_batch_size": micro},
            "rollout": {"max_new_tokens": RESPONSE},
        }
    )
    spec = losses.get_policy_loss(loss)
    controller = spec.controller(config.loss_settings()) if spec.controller else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    count[0] = 0
    update_policy(
        model,
        optimizer,
        batch(),
        config,
        generator=torch.Generator().manual_seed(0),
        loss_kwargs=controller.loss_kwargs() if controller else None,
    )
    return count[0]


def main() -> None:
    print("| loss | 1 micro-batch | 4 micro-batches | per further micro-batch |")
    print("|---|---:|---:|---:|")
    with counting_reads() as count:
        for loss in losses.POLICY_LOSSES:
            one, four = reads(loss, ROWS, count), reads(loss, ROWS // 4, count)
            print(f"| {loss} | {one} | {four} | {(four - one) / 3:.0f} |")


if __name__ == "__main__":
    main()
