"""A tiny T5 text encoder and tokenizer built in code (nothing downloaded), for the tiny Flux and SD3 test pipelines.

* :func:`tiny_t5_tokenizer`: a ``T5Tokenizer`` (transformers' tokenizers-backed class) on a hand-written Unigram
  vocabulary: T5's special ids (<pad> 0, </s> 1, <unk> 2), the word-start piece, a few whole words and single
  characters, no ``<extra_id_*>`` tokens; it appends </s> as T5's does. Saved and reloaded with ``AutoTokenizer``.
* :func:`tiny_t5_encoder`: a random 2-layer ``T5EncoderModel`` (gated-GELU feed-forward, as the T5 v1.1 encoders of
  SD3 and Flux) of width ``d_model``; draws from the global RNG.
"""

from __future__ import annotations

import string

WORDS = ("a", "the", "cat", "dog", "ugly", "photo", "of")  # whole-word pieces (the test prompts' words)


def tiny_t5_tokenizer():
    """The tiny T5 tokenizer (len 46: 3 special ids, the word-start piece, 7 words, 35 characters)."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -3.0) for w in WORDS]
    vocab += [(c, -5.0) for c in string.ascii_lowercase + string.digits[1:]]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_t5_encoder(tokenizer, d_model: int):
    """A random 2-layer ``T5EncoderModel`` of width ``d_model`` (4 heads of d_model / 4, feed-forward 2 d_model)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // 4, d_ff=2 * d_model, num_layers=2,
                      num_heads=4, feed_forward_proj="gated-gelu", pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    return T5EncoderModel(config)


__all__ = ["tiny_t5_encoder", "tiny_t5_tokenizer"]
