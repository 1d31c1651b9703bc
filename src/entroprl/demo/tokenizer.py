"""A character-level fast tokenizer built by the project (no download), for the built-in tasks."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

DEFAULT_ALPHABET = "0123456789+-*/()=> ,."
"""Digits, arithmetic, the Countdown prompt markers ``>`` and ``=``, space and punctuation."""

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, BOS, UNK)


def build_char_tokenizer(alphabet: str = DEFAULT_ALPHABET) -> PreTrainedTokenizerFast:
    """One token per character of `alphabet` plus ``<pad>`` (id 0), ``<eos>``, ``<bos>``, ``<unk>``.

    The backend is a byte-level BPE with no merges, so every character is its own token and
    ``decode(encode(s)) == s`` for any string over the alphabet. Byte-level rather than WordLevel
    because transformers 5's `AutoTokenizer` replaces the pipeline of a directory whose
    config.json says ``model_type: qwen2`` with Qwen2's byte-level one, which drops characters a
    WordLevel vocabulary spells plainly (the space); a merge-free byte-level vocabulary gives the
    same tokens under both. Characters outside the alphabet encode to ``<unk>`` here (the Qwen2
    pipeline drops them). No special token is added on encoding; padding is on the left, as
    batched generation needs.
    """
    chars = list(dict.fromkeys(alphabet))
    if not chars:
        raise ValueError("alphabet is empty")
    bad = [c for c in chars if not " " <= c <= "~"]
    if bad:
        raise ValueError(f"alphabet must be printable ASCII, got {bad!r}")
    to_bytes_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    symbols = [to_bytes_level.pre_tokenize_str(c)[0][0] for c in chars]
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *symbols])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.pre_tokenizer = to_bytes_level
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=BOS,
        unk_token=UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
    )
