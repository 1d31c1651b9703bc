"""A tiny untrained policy for tests: a 1-layer Qwen2 and the project's char-level tokenizer."""

from entroprl.models import build_model, tiny_config
from entroprl.tokenizer import build_char_tokenizer


def make_tiny_policy(seed: int = 0):
    tok = build_char_tokenizer()
    config = tiny_config(
        len(tok),
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    return build_model(config, seed=seed), tok
