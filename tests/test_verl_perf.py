"""entroprl.train.perf against verl's own counter (in .venv-verl: scripts/test.sh): the training
FLOPs of a batch, and the GPUs' peaks by name."""

import pytest
from transformers import LlamaConfig, Qwen2Config, Qwen2MoeConfig, Qwen3Config, Qwen3MoeConfig

pytestmark = pytest.mark.verl
pytest.importorskip(
    "verl",
    reason="verl is not installed in this environment; scripts/test.sh runs these in .venv-verl",
)

from verl.utils import flops_counter  # noqa: E402

from entroprl.train import perf  # noqa: E402

SHAPE = dict(
    vocab_size=1000,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=3,
    num_attention_heads=8,
    num_key_value_heads=2,
)
MOE = dict(moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2)
CONFIGS = {
    "qwen2": Qwen2Config(**SHAPE),
    "llama": LlamaConfig(**SHAPE),
    "qwen3": Qwen3Config(**SHAPE, head_dim=16),
    "qwen2_moe": Qwen2MoeConfig(**SHAPE, **MOE),
    "qwen3_moe": Qwen3MoeConfig(**SHAPE, **MOE, head_dim=16),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_training_flops_are_verls(name):
    config = CONFIGS[name]
    lengths = [17, 250, 3, 96, 96]
    tokens = perf.TokenCounts(
        sampled=0, in_loss=0, total=sum(lengths), squares=sum(x * x for x in lengths)
    )
    ours = perf.flops_model(config).training_flops(tokens)
    # FlopsCounter.estimate_flops's count, without its look-up of the peak (CUDA only)
    estimate = flops_counter.ESTIMATE_FUNC[config.model_type]
    achieved = estimate(config, sum(lengths), lengths, 1.0)
    assert ours == pytest.approx(achieved * 1e12, rel=1e-12)


@pytest.mark.parametrize("name", flops_counter._DEVICE_FLOPS)
def test_peaks_are_verls(name):
    if name in ("CPU", "910B", "A2G3", "Ascend950DT", "Ascend910", "RTX 3070 Ti"):
        # not a data-centre GPU: no MFU
        assert perf.peak_by_name(f"NVIDIA {name}") is None
        return
    verls = flops_counter.get_device_flops(unit="T", device_name=f"NVIDIA {name}")
    assert perf.peak_by_name(f"NVIDIA {name}") == pytest.approx(verls)


def test_but_the_h100s_pcie_part_is_not_its_sxm_part():
    assert flops_counter.get_device_flops(unit="T", device_name="NVIDIA H100 PCIe") == 989.0
    assert perf.peak_by_name("NVIDIA H100 PCIe") == 756.0
