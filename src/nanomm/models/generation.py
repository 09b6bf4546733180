"""Autoregressive decoding with a KV cache, shared by every decoder (GPT, LLaMA; BLIP-2/LLaVA via a prefix).

    greedy   x_{t+1} = argmax_v ℓ_t[v]
    sample   x_{t+1} ~ softmax(f(ℓ_t)),   f = top_p ∘ top_k ∘ (· / τ)     (applied in that order)

ℓ_t are the logits of the last position. Temperature τ < 1 sharpens the distribution, τ > 1 flattens it.
Top-k keeps the k largest logits (Fan et al., 2018, "Hierarchical Neural Story Generation"); top-p, the
nucleus, keeps the smallest set of most probable tokens whose mass reaches p (Holtzman et al., 2020,
"The Curious Case of Neural Text Degeneration", Eq. 2–3). Each is a small function of the logits,
picked from ``LOGIT_TRANSFORMS`` and composed in a list.

The KV cache. Without it, step t re-runs the whole prefix of length P + t through every layer: O(t)
matmul work per layer and O(t²) attention. With it the keys and values of past positions are kept
(``nanomm.nn.attention.KVCache``), each step feeds only the newest token, and its query attends to the
cached keys: O(1) matmul work and O(t) attention (Pope et al., 2022, "Efficiently Scaling Transformer
Inference", §2). The logits are the same up to floating-point summation order.

Batched prompts are padded on the LEFT, so every row's last prompt token sits in the last column and
the new tokens of all rows are written to the same column. The attention mask covers past and new
tokens, and positions count real tokens only (cumsum − 1), so a padded row computes what it would alone.
Rows that emit a stop token are finished: from then on they receive ``pad_token_id``, and decoding
stops once every row is finished.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["generate", "GenerationOutput", "apply_temperature", "top_k_filter", "top_p_filter",
           "logit_transforms", "LOGIT_TRANSFORMS", "CHOOSERS"]

Transform = Callable[[Tensor], Tensor]


# ----------------------------------------------------------------------------- logit transforms

def _check_scores(scores: Tensor) -> None:
    if not isinstance(scores, Tensor) or not scores.is_floating_point() or scores.dim() < 1:
        got = f"{scores.dtype} {tuple(scores.shape)}" if isinstance(scores, Tensor) else type(scores).__name__
        raise TypeError(f"scores: expected a floating tensor (..., V) of logits, got {got}")


def apply_temperature(scores: Tensor, temperature: float) -> Tensor:
    """ℓ / τ: the softmax of the result is p^(1/τ), renormalised."""
    _check_scores(scores)
    _check_temperature(temperature)
    return scores / temperature


def top_k_filter(scores: Tensor, k: int, *, min_keep: int = 1) -> Tensor:
    """Set to −inf every logit below the k-th largest of its row (ties with the k-th are kept)."""
    _check_scores(scores)
    _check_top_k(k)
    k = min(max(k, min_keep), scores.shape[-1])
    kth = scores.topk(k, dim=-1).values[..., -1:]  # (..., 1)
    return scores.masked_fill(scores < kth, float("-inf"))


def top_p_filter(scores: Tensor, p: float, *, min_keep: int = 1) -> Tensor:
    """Keep the smallest set of most probable tokens whose probability sums to at least p.

    A token is dropped when the tokens more probable than it already hold mass ≥ p.
    """
    _check_scores(scores)
    _check_top_p(p)
    ordered, order = scores.sort(dim=-1, descending=True)  # (..., V)
    probs = ordered.softmax(dim=-1)
    cum = probs.cumsum(dim=-1)
    above = torch.cat([torch.zeros_like(cum[..., :1]), cum[..., :-1]], dim=-1)  # mass strictly above each token
    drop_sorted = above >= p
    drop_sorted[..., :min_keep] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order
    return scores.masked_fill(drop, float("-inf"))


# name -> (builder from the option's value, the value that means "off"); applied in this order, as
# transformers does: temperature first, so top-p measures mass under the tempered distribution
LOGIT_TRANSFORMS: dict[str, tuple[Callable[[Any], Transform], Any]] = {
    "temperature": (lambda t: (lambda s: apply_temperature(s, t)), 1.0),
    "top_k": (lambda k: (lambda s: top_k_filter(s, k)), None),
    "top_p": (lambda p: (lambda s: top_p_filter(s, p)), 1.0),
}


def logit_transforms(**options: Any) -> list[Transform]:
    """The transforms asked for, in ``LOGIT_TRANSFORMS`` order; options at their "off" value are skipped."""
    unknown = sorted(set(options) - set(LOGIT_TRANSFORMS))
    if unknown:
        raise ValueError(f"options: unknown {unknown}; expected some of {list(LOGIT_TRANSFORMS)}")
    return [build(options[name]) for name, (build, off) in LOGIT_TRANSFORMS.items()
            if name in options and options[name] is not None and options[name] != off]


def _greedy(scores: Tensor, generator: torch.Generator | None) -> Tensor:
    return scores.argmax(dim=-1)  # (B,)


def _sample(scores: Tensor, generator: torch.Generator | None) -> Tensor:
    probs = scores.softmax(dim=-1)  # −inf logits get probability exactly 0
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


CHOOSERS: dict[str, Callable[[Tensor, torch.Generator | None], Tensor]] = {"greedy": _greedy, "sample": _sample}


# ----------------------------------------------------------------------------- validation

def _check_temperature(t: Any) -> None:
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0 or t == float("inf"):
        raise ValueError(f"temperature: expected a finite number > 0, got {t!r}")


def _check_top_k(k: Any) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ValueError(f"top_k: expected a positive int, got {k!r}")


def _check_top_p(p: Any) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
        raise ValueError(f"top_p: expected a probability in (0, 1], got {p!r}")


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return value


def _token_ids(name: str, value: Any, vocab: int | None) -> list[int]:
    ids = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(ids, (list, tuple)) or not ids or \
            any(isinstance(i, bool) or not isinstance(i, int) or i < 0 or (vocab and i >= vocab) for i in ids):
        bound = f" < vocab_size={vocab}" if vocab else ""
        raise ValueError(f"{name}: expected a token id or a non-empty list of ids >= 0{bound}, got {value!r}")
    return list(ids)


def _check_prompt(input_ids: Tensor | None, inputs_embeds: Tensor | None, attention_mask: Tensor | None,
                  model: nn.Module) -> tuple[int, int]:
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("input_ids, inputs_embeds: expected exactly one of them (the prompt), got "
                         + ("both" if input_ids is not None else "neither"))
    if input_ids is not None:
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point \
                or input_ids.dtype == torch.bool or input_ids.shape[1] == 0:
            got = f"{input_ids.dtype} {tuple(input_ids.shape)}" if isinstance(input_ids, Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids: expected integer ids of shape (B, T) with T >= 1, got {got}")
        B, T = input_ids.shape
    else:
        accepts = "inputs_embeds" in inspect.signature(model.forward).parameters
        if not accepts:
            raise TypeError(f"inputs_embeds: {type(model).__name__}.forward takes no inputs_embeds argument, "
                            "so a prefix of embeddings cannot be fed to it; pass input_ids")
        if not isinstance(inputs_embeds, Tensor) or inputs_embeds.dim() != 3 or not inputs_embeds.is_floating_point() \
                or inputs_embeds.shape[1] == 0:
            got = f"{inputs_embeds.dtype} {tuple(inputs_embeds.shape)}" if isinstance(inputs_embeds, Tensor) \
                else type(inputs_embeds).__name__
            raise ValueError(f"inputs_embeds: expected floating embeddings of shape (B, T, d) with T >= 1, got {got}")
        B, T = inputs_embeds.shape[:2]
    if attention_mask is not None:
        if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != (B, T):
            got = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
            raise ValueError(f"attention_mask: expected shape (B, T) = ({B}, {T}) like the prompt, got {got}")
        keep = attention_mask.bool()
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask: expected 0 (pad) and 1 (token) only")
        if not bool(keep[:, -1].all()) or bool((keep[:, 1:] < keep[:, :-1]).any()):
            raise ValueError("attention_mask: expected LEFT padding (zeros, then ones, each row ending in a "
                             f"token) so new tokens of all rows share a column; got rows {attention_mask.tolist()}")
    return B, T


def _position_limit(model: nn.Module) -> int | None:
    """Rows of a position table the model adds to its input (None when positions are unbounded)."""
    wpe = getattr(getattr(model, "positions", None), "wpe", None)
    return getattr(wpe, "max_positions", None)


# ----------------------------------------------------------------------------- the two ways to step

def _length(inputs: dict[str, Tensor]) -> int:
    return next(iter(inputs.values())).shape[1]  # input_ids (B, T) or inputs_embeds (B, T, d)


class _Cached:
    """Prefill the prompt once, then feed one token per step against the KV cache."""

    def __init__(self, model: nn.Module, prompt: dict[str, Tensor], mask: Tensor | None, pos: Tensor | None):
        self.model, self.mask, self.pos, self.cache = model, mask, pos, None
        self.prompt, self.t = prompt, _length(prompt)

    def _call(self, inputs: dict[str, Tensor], end: int) -> Tensor:
        start = end - _length(inputs)
        out = self.model(**inputs, attention_mask=None if self.mask is None else self.mask[:, :end],
                         position_ids=None if self.pos is None else self.pos[:, start:end],
                         past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        return out.logits[:, -1]  # (B, V)

    def first(self) -> Tensor:
        return self._call(self.prompt, self.t)

    def next(self, token: Tensor) -> Tensor:
        self.t += 1
        return self._call({"input_ids": token[:, None]}, self.t)


class _Uncached:
    """Re-run the whole sequence every step: the reference the cache must reproduce."""

    def __init__(self, model: nn.Module, prompt: dict[str, Tensor], mask: Tensor | None, pos: Tensor | None):
        self.model, self.mask, self.pos, self.prompt = model, mask, pos, prompt
        self.new: list[Tensor] = []

    def _inputs(self) -> dict[str, Tensor]:
        if not self.new:
            return self.prompt
        new = torch.stack(self.new, dim=1)  # (B, t)
        if "input_ids" in self.prompt:
            return {"input_ids": torch.cat([self.prompt["input_ids"], new], dim=1)}
        embed = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") \
            else self.model.embed_tokens
        return {"inputs_embeds": torch.cat([self.prompt["inputs_embeds"], embed(new)], dim=1)}

    def first(self) -> Tensor:
        inputs = self._inputs()
        end = _length(inputs)
        out = self.model(**inputs, attention_mask=None if self.mask is None else self.mask[:, :end],
                         position_ids=None if self.pos is None else self.pos[:, :end], use_cache=False)
        return out.logits[:, -1]  # (B, V)

    def next(self, token: Tensor) -> Tensor:
        self.new.append(token)
        return self.first()


STEPPERS: dict[bool, type] = {True: _Cached, False: _Uncached}  # keyed by use_cache


# ----------------------------------------------------------------------------- generate

@dataclass
class GenerationOutput:
    """``sequences`` (B, T + n): the prompt (absent when it was given as embeddings) then n new tokens;
    ``scores`` / ``logits``: per step (B, V) after / before the transforms, when asked for;
    ``finished`` (B,): rows that emitted a stop token."""

    sequences: Tensor
    prompt_length: int
    finished: Tensor
    scores: tuple[Tensor, ...] | None = None
    logits: tuple[Tensor, ...] | None = None

    @property
    def new_tokens(self) -> Tensor:
        return self.sequences[:, self.prompt_length:]  # (B, n)


def generate(model: nn.Module, input_ids: Tensor | None = None, attention_mask: Tensor | None = None, *,
             inputs_embeds: Tensor | None = None, max_new_tokens: int = 20, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
             use_cache: bool = True, seed: int | None = None, generator: torch.Generator | None = None,
             output_scores: bool = False, output_logits: bool = False,
             on_token: Callable[[int, Tensor], None] | None = None) -> GenerationOutput:
    """Continue left-padded prompts ``input_ids`` (B, T) by up to ``max_new_tokens`` tokens.

    do_sample=False is greedy (temperature, top_k, top_p must stay off); True samples from the tempered,
    filtered distribution with ``generator`` (or a new one seeded with ``seed``). ``eos_token_id`` (one id
    or several) ends a row, which is padded with ``pad_token_id`` (default: the first eos id) afterwards.
    ``inputs_embeds`` (B, T, d) replaces input_ids for models whose forward accepts it (a multimodal
    prefix); the output then holds the new tokens only. ``on_token(n, tokens (B,))`` is called as the n-th
    new tokens are chosen (streaming, timing). The model runs in eval mode (its mode is restored after)
    under ``torch.inference_mode``, so the returned scores/logits are inference tensors (clone them to
    modify them in place).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module decoder, got {type(model).__name__}")
    B, T = _check_prompt(input_ids, inputs_embeds, attention_mask, model)
    _positive_int("max_new_tokens", max_new_tokens)
    if not isinstance(do_sample, bool):
        raise TypeError(f"do_sample: expected a bool, got {type(do_sample).__name__}")
    if not isinstance(use_cache, bool):
        raise TypeError(f"use_cache: expected a bool, got {type(use_cache).__name__}")
    _check_temperature(temperature)
    if top_k is not None:
        _check_top_k(top_k)
    _check_top_p(top_p)
    if not do_sample:
        on = {k: v for k, v in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p))
              if v is not None and v != LOGIT_TRANSFORMS[k][1]}
        if on:
            raise ValueError(f"do_sample: greedy decoding ignores {on}; pass do_sample=True to sample with them")
    if seed is not None and generator is not None:
        raise ValueError("seed, generator: expected at most one of them, got both")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
    if on_token is not None and not callable(on_token):
        raise TypeError(f"on_token: expected a callable (n, tokens), got {type(on_token).__name__}")
    if seed is not None:
        _positive_int("seed", seed, minimum=0)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    eos = _token_ids("eos_token_id", eos_token_id, vocab) if eos_token_id is not None else []
    if pad_token_id is not None:
        pad_token_id = _token_ids("pad_token_id", pad_token_id, vocab)[0]
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    limit = _position_limit(model)
    if limit is not None and T + max_new_tokens > limit:
        raise ValueError(f"max_new_tokens: prompt length {T} + {max_new_tokens} new tokens exceeds the model's "
                         f"{limit} learned positions")

    device = (input_ids if input_ids is not None else inputs_embeds).device
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    transforms = logit_transforms(temperature=temperature, top_k=top_k, top_p=top_p) if do_sample else []
    choose = CHOOSERS["sample" if do_sample else "greedy"]

    # a mask of all ones changes nothing: dropping it lets attention take its unmasked fast path
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None
    mask = pos = None
    if attention_mask is not None:
        # preallocated for the whole run; each step reads a prefix view instead of concatenating
        mask = torch.ones(B, T + max_new_tokens, dtype=torch.long, device=device)
        mask[:, :T] = attention_mask
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T + n): real tokens count from 0
    prompt = {"input_ids": input_ids} if input_ids is not None else {"inputs_embeds": inputs_embeds}
    keep_prompt = input_ids is not None
    out = torch.full((B, (T if keep_prompt else 0) + max_new_tokens), pad, dtype=torch.long, device=device)
    if keep_prompt:
        out[:, :T] = input_ids
    start = T if keep_prompt else 0
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    eos_t = torch.tensor(eos, dtype=torch.long, device=device)
    scores_seen: list[Tensor] = []
    logits_seen: list[Tensor] = []

    was_training = model.training
    model.eval()
    try:
        # inference_mode, not no_grad: no autograd bookkeeping at all (version counters), a few % per step
        with torch.inference_mode():
            stepper = STEPPERS[use_cache](model, prompt, mask, pos)
            logits = stepper.first()
            n = 0
            for n in range(1, max_new_tokens + 1):
                # float32 at least: top-p's cumulative sums in bfloat16 would misplace the nucleus edge
                scores = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
                for transform in transforms:
                    scores = transform(scores)
                if output_logits:
                    logits_seen.append(logits)
                if output_scores:
                    scores_seen.append(scores)
                token = choose(scores, generator)  # (B,)
                if eos:
                    token = token.masked_fill(finished, pad)
                    finished |= torch.isin(token, eos_t)
                out[:, start + n - 1] = token
                if on_token is not None:
                    on_token(n, token)
                if n == max_new_tokens or (eos and bool(finished.all())):
                    break
                logits = stepper.next(token)
    finally:
        model.train(was_training)
    return GenerationOutput(sequences=out[:, :start + n], prompt_length=start, finished=finished,
                            scores=tuple(scores_seen) if output_scores else None,
                            logits=tuple(logits_seen) if output_logits else None)
