"""``nanomm generate``: continue a prompt with a decoder saved as a Hugging Face folder.

The folder holds config.json, the weights (``nanomm.models.to_hf`` writes the same layout, so a nanomm
model and a transformers checkpoint load alike through ``from_hf``) and a ``tokenizer.json`` read with
the ``tokenizers`` library. Generation stops at the tokenizer's end-of-text token (or config.json's
``eos_token_id``) or after ``max_new_tokens``.

Decoding: greedy unless one of temperature, top_k, top_p is given, which then samples (temperature 1
when only a filter is given); temperature 0 means greedy explicitly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch

from nanomm.models.generation import generate

__all__ = ["generate_cli", "load_decoder", "EOS_TOKENS"]

# end-of-text spellings of common vocabularies, first match wins: LLaMA-1/2, GPT-2 and nanomm's BPE, LLaMA-3
EOS_TOKENS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<|eot_id|>", "<eos>")


def _find_tokenizer(folder: Path, root: Path) -> Path:
    for candidate in (folder / "tokenizer.json", root / "tokenizer.json"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"model_dir: expected a tokenizer.json in {str(root)!r}, found none")


def load_decoder(model_dir: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """(model, tokenizers.Tokenizer, eos ids) of a folder; the model must be a decoder (GPT or LLaMA)."""
    from tokenizers import Tokenizer

    from nanomm.models.gpt import DecoderLM
    from nanomm.models.hub import from_hf, resolve_hf_dir

    root = Path(model_dir)
    folder = resolve_hf_dir(root)
    model = from_hf(folder, dtype=dtype)
    if not isinstance(model, DecoderLM):
        raise TypeError(f"model_dir: holds a {type(model).__name__}, which does not generate text; "
                        "expected a decoder (GPT-2, GPT-1 or LLaMA folder)")
    tokenizer = Tokenizer.from_file(str(_find_tokenizer(folder, root)))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    config_eos = json.loads((folder / "config.json").read_text()).get("eos_token_id")
    if config_eos is not None:
        eos = config_eos if isinstance(config_eos, list) else [config_eos]
    else:
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        eos = [vocab[t] for t in EOS_TOKENS if t in vocab][:1]
    eos = [i for i in eos if 0 <= i < model.config.vocab_size]
    return model, tokenizer, eos


def generate_cli(model_dir: str | os.PathLike, prompt: str, *, max_new_tokens: int = 50,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, stream: Callable[[str], None] | None = None) -> str:
    """Continue ``prompt`` with the decoder in ``model_dir``; return the continuation (text after the prompt).

    ``stream(text)`` receives each new piece of text as it is decoded (the CLI prints it without newline).
    """
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"prompt: expected a non-empty string, got {prompt!r}")
    if temperature == 0 and (top_k is not None or top_p is not None):
        raise ValueError("temperature: 0 means greedy decoding, which ignores top_k/top_p; give temperature > 0")
    sample = temperature != 0 and any(v is not None for v in (temperature, top_k, top_p))
    model, tokenizer, eos = load_decoder(model_dir)
    ids = tokenizer.encode(prompt).ids
    if not ids:
        raise ValueError(f"prompt: {prompt!r} encodes to no tokens")
    input_ids = torch.tensor([ids], dtype=torch.long)
    new_ids: list[int] = []
    shown = ""

    def on_token(n: int, tokens: torch.Tensor) -> None:
        # decode everything new so far and emit the difference: a byte-level BPE piece may become a
        # character only once the next piece arrives, so decoding token by token would print broken bytes
        nonlocal shown
        new_ids.append(int(tokens[0]))
        if stream is None:
            return
        text = tokenizer.decode(new_ids)
        if text.startswith(shown) and len(text) > len(shown):
            stream(text[len(shown):])
            shown = text

    sampling = dict(do_sample=True, temperature=temperature or 1.0, top_k=top_k, top_p=1.0 if top_p is None else top_p,
                    seed=seed) if sample else {}
    out = generate(model, input_ids, max_new_tokens=max_new_tokens, eos_token_id=eos or None, on_token=on_token,
                   **sampling)
    new = out.new_tokens[0].tolist()
    if out.finished[0] and new and new[-1] in eos:
        new = new[:-1]
    text = tokenizer.decode(new)
    if stream is not None and text.startswith(shown) and len(text) > len(shown):
        stream(text[len(shown):])
    return text
