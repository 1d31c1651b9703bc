"""`model.compile`: each decoder layer compiled with `torch.compile` (as torchtitan compiles each
transformer block), for the training forwards, their backward and the no-grad log-prob passes.
Under FSDP2 the layers are the sharded units: their all-gathers and reduce-scatters run in FSDP's
forward hooks, which FSDP2 keeps out of any compiled code (`torch._dynamo.disable`), so the layer's
own arithmetic is compiled and the communication is FSDP's, as without compiling.

Compiling fuses the memory-bound elementwise work between the matrix products (RMSNorm's float32
upcasts, SwiGLU, rotary embeddings), which a GPU profile of the update found to be most of its time
(docs/benchmarks.md). Layers are compiled in place (`nn.Module.compile`), so parameter names and
checkpoints are unchanged, with dynamic shapes, so that each step's new sequence lengths reuse the
compiled code. Sampling runs the layers eagerly (`eager`): the GPU sampler replays CUDA graphs of
its own, which a compilation must not happen inside, and a CPU run would compile the decoding
shapes for little gain.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from entroprl.errors import ConfigError
from entroprl.train import parallel


def compile_layers(model: torch.nn.Module) -> None:
    """Compile `model`'s decoder layers (`parallel.decoder_layers`) in place."""
    layers = parallel.decoder_layers(model)
    if not layers:
        raise ConfigError(
            f"model.compile: {type(model).__name__} lists no decoder layer class in "
            "_no_split_modules, so there is nothing to compile: set model.compile=false"
        )
    for layer in layers:
        layer.compile(dynamic=True)


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Within it, compiled modules run their original Python code and compile nothing."""
    with torch.compiler.set_stance("force_eager"):
        yield
