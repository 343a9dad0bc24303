"""polyattn's tokenizers as transformers `PreTrainedTokenizerFast`s, so `AutoTokenizer` reads a converted folder.

- BPE (`BpeTokenizer`): its Hugging Face `tokenizers` model itself, with `<|endoftext|>` as the end-of-sequence
  (and padding) token.
- Bytes (`ByteTokenizer`): a byte-level BPE model with the 256 byte symbols as its vocabulary and no merges, so
  every UTF-8 byte is one token whose id is the byte's value, exactly polyattn's ids; GPT-2's byte-to-symbol table
  lets any byte be a token. It has no special tokens (polyattn's byte models have none to give it).
- A masked LM's `[MASK]` is the id after the tokenizer's own (`polyattn.models.bert`), added as a special token.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

from ..data.tokenizers import EOS_TOKEN, Tokenizer

MASK_TOKEN = "[MASK]"


def _byte_level_tokenizer():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {symbol: byte for byte, symbol in bytes_to_unicode().items()}  # id = byte value
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def hf_tokenizer(tokenizer: Tokenizer, *, mask_token_id: int | None = None) -> PreTrainedTokenizerFast:
    """The `PreTrainedTokenizerFast` giving `tokenizer`'s ids (module docstring); `mask_token_id`: a masked LM's
    `[MASK]` id, which must be the first id after the tokenizer's vocabulary."""
    from tokenizers import Tokenizer as HFTokenizer

    if tokenizer.kind == "byte":
        fast = PreTrainedTokenizerFast(tokenizer_object=_byte_level_tokenizer(), clean_up_tokenization_spaces=False)
    else:
        fast = PreTrainedTokenizerFast(tokenizer_object=HFTokenizer.from_str(tokenizer.to_str()),
                                       eos_token=EOS_TOKEN, pad_token=EOS_TOKEN, clean_up_tokenization_spaces=False)
    if mask_token_id is not None:
        if mask_token_id != tokenizer.vocab_size:
            raise ValueError(f"[MASK] must be id {tokenizer.vocab_size} (after the tokenizer's own), got "
                             f"{mask_token_id}")
        fast.add_special_tokens({"mask_token": MASK_TOKEN})
        assert fast.mask_token_id == mask_token_id, (fast.mask_token_id, mask_token_id)
    return fast


__all__ = ["MASK_TOKEN", "hf_tokenizer"]
