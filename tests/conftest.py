import pytest
import torch

from tests.policies import make_tiny_policy


@pytest.fixture(autouse=True)
def _two_threads():
    torch.set_num_threads(2)


@pytest.fixture
def tiny_policy():
    """A fresh, untrained tiny Qwen2 policy and the project's char-level tokenizer."""
    return make_tiny_policy()
