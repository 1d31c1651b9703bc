import signal

import pytest
import torch

from tests.policies import make_tiny_policy

# A suite started in the background by a non-interactive shell (`bash scripts/test.sh &`) inherits
# SIGINT ignored, and so would every run its tests start: the Ctrl-C tests (test_faults, test_demo)
# need what a terminal gives. A Python handler here is reset to the default in each child.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _two_threads():
    torch.set_num_threads(2)


@pytest.fixture
def tiny_policy():
    """A fresh, untrained tiny Qwen2 policy and the project's char-level tokenizer."""
    return make_tiny_policy()


def pytest_collection_modifyitems(config, items):
    """Skip the `vllm` tests, with the reason, where vLLM is not installed (the main .venv)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        return
    skip = pytest.mark.skip(
        reason="vLLM is not installed in this environment: scripts/test.sh runs the vllm "
        "tests in .venv-vllm (bash scripts/vllm_env.sh creates it)"
    )
    for item in items:
        if item.get_closest_marker("vllm") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_run_device_left_behind():
    """A trainer declares its device to the collectives (`distributed.use_device`); the next
    test starts without it."""
    yield
    from entroprl.train import distributed

    distributed.use_device(None)
