"""Answer generation from retrieved chunks: the prompt with numbered sources, and the generators.

The prompt numbers each retrieved chunk [1], [2] … with its source, asks for an answer from those
sources only, with citations, and for the exact abstain phrase when they do not contain the answer —
"I don't know", or "我不知道" for a question in Chinese (Lewis et al., "Retrieval-Augmented
Generation", 2020, for the retrieve-then-read scheme; the abstain instruction is hallucination control).

Generators, from ``GENERATORS``:
  extractive  no model: quotes the sentences of the sources closest to the question — the mean of the
              MiniLM cosine and the idf-weighted share of the question's terms the sentence contains
              (the latter alone without vectors) — each with its citation.
              With temperature > 0 it samples sentences from softmax(score / T), for self-consistency.
  local       a causal LM nanomm loads (nanomm.models.from_hf: GPT-2 or LLaMA folders, nanomm's own
              checkpoints saved that way), decoded by nanomm.models.generation with a KV cache
  openai      any OpenAI-compatible HTTP endpoint (/chat/completions), base URL + model name, stdlib urllib
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from typing import Callable, Sequence

import numpy as np

from nanomm.rag.text import language

__all__ = ["ABSTAIN", "SYSTEM", "build_prompt", "ExtractiveGenerator", "LocalLMGenerator", "OpenAIGenerator",
           "GENERATORS", "make_generator", "strip_citations"]

ABSTAIN = {"en": "I don't know.", "zh": "我不知道。"}
SYSTEM = {
    "en": ("Answer the question using only the numbered sources. Cite every claim with its source number, "
           "like [1]. If the sources do not contain the answer, reply exactly: I don't know."),
    "zh": "只根据下面编号的资料回答问题，每个论断都用资料编号引用，如 [1]。如果资料中没有答案，只回答：我不知道。",
}
_CITATION = re.compile(r"\s*\[\d+(?:\s*,\s*\d+)*\]")


def strip_citations(text: str) -> str:
    return _CITATION.sub("", text).strip()


def build_prompt(question: str, hits: Sequence, *, lang: str | None = None, max_chars: int = 6000) -> str:
    """The user prompt: numbered sources (cut to ``max_chars`` in all), then the question."""
    lang = lang or language(question)
    parts, used = [], 0
    for n, hit in enumerate(hits, 1):
        c = hit.chunk
        text = c.text[: max(0, max_chars - used)]
        if not text:
            break
        used += len(text)
        parts.append(f"[{n}] ({c.source}{' — ' + c.section if c.section else ''})\n{text}")
    head, q, a = ("资料：", "问题：", "答案：") if lang == "zh" else ("Sources:", "Question: ", "Answer:")
    return f"{head}\n\n" + "\n\n".join(parts) + f"\n\n{q}{question}\n{a}"


# ---- extractive -------------------------------------------------------------------------------------

class ExtractiveGenerator:
    """Quotes the best supporting sentences of the retrieved chunks, cited. Needs the index (its sentences)."""

    name = "extractive"
    default_temperature = 0.05  # sentence scores differ by ~0.05–0.2: this keeps the best usually, not always

    def __init__(self, max_sentences: int = 2, min_words: int = 4, relative: float = 0.85):
        self.max_sentences, self.min_words, self.relative = max_sentences, min_words, relative

    def _candidates(self, question: str, hits: Sequence, index) -> list[tuple[float, int, int]]:
        """(score, citation number, sentence index) for each sentence of the hits."""
        store = index.sentences
        position = {h.chunk.id: n for n, h in enumerate(hits, 1)}
        idx = store.of_chunks(sorted(position))
        texts = [store.text(i, index.chunks) for i in idx]
        keep = [j for j, t in enumerate(texts) if len(t.split()) >= self.min_words or language(t) == "zh"]
        # headings, code and tables are not answers; nor is a line that is mostly `code`
        keep = [j for j in keep if not texts[j].lstrip().startswith(("#", "```", "|")) and texts[j].count("`") < 4]
        if not keep:
            return []
        q_terms = index.bm25.analyzer(question)
        scores = np.asarray([index.bm25.coverage(q_terms, texts[j]) for j in keep])
        if store.vectors is not None and index.dense is not None:  # meaning and words, half each
            scores = 0.5 * scores + 0.5 * (store.vectors[idx[keep]] @ index.query_vector(question))
        return [(float(s), position[int(store.chunk[idx[j]])], int(idx[j])) for s, j in zip(scores, keep)]

    def answer(self, question: str, hits: Sequence, index, *, n: int = 1, temperature: float = 0.0,
               seed: int = 0) -> list[str]:
        cands = sorted(self._candidates(question, hits, index), key=lambda c: (-c[0], c[1], c[2]))
        if not cands:
            return [ABSTAIN[language(question)]] * n
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(n):
            if temperature > 0:  # sample sentences without replacement, weighted by softmax(score / T)
                s = np.asarray([c[0] for c in cands])
                p = np.exp((s - s.max()) / temperature)
                order = rng.choice(len(cands), size=len(cands), replace=False, p=p / p.sum())
                picked = [cands[i] for i in order]
            else:
                picked = cands
            best = picked[0][0]
            chosen = [c for c in picked[: self.max_sentences] if c[0] >= self.relative * best or c is picked[0]]
            chosen.sort(key=lambda c: (c[1], c[2]))  # in source order: reads as a passage
            out.append(" ".join(f"{index.sentences.text(i, index.chunks)} [{m}]" for _, m, i in chosen))
        return out


# ---- LLM generators: complete(prompt, n, temperature) -> [str]; answer() builds the prompt ------------

class _LLM:
    def complete(self, prompt: str, *, n: int = 1, temperature: float = 0.0, system: str | None = None,
                 seed: int = 0) -> list[str]:
        raise NotImplementedError

    def answer(self, question: str, hits: Sequence, index=None, *, n: int = 1, temperature: float = 0.0,
               seed: int = 0) -> list[str]:
        lang = language(question)
        return self.complete(build_prompt(question, hits, lang=lang), n=n, temperature=temperature,
                             system=SYSTEM[lang], seed=seed)


class OpenAIGenerator(_LLM):
    """POST {base_url}/chat/completions; the API key, if any, from the environment variable ``api_key_env``."""

    name = "openai"

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY", timeout: float = 120.0,
                 max_tokens: int = 400):
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url: expected an http(s) URL, got {base_url!r}")
        if not model:
            raise ValueError("model: expected the model name the endpoint serves, got an empty value")
        self.base_url, self.model = base_url.rstrip("/"), model
        self.api_key_env, self.timeout, self.max_tokens = api_key_env, timeout, max_tokens

    def _post(self, payload: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(f"{self.base_url}/chat/completions", json.dumps(payload).encode("utf-8"), headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{self.base_url}: HTTP {e.code}: {e.read().decode('utf-8', 'replace')[:300]}") from None

    def complete(self, prompt: str, *, n: int = 1, temperature: float = 0.0, system: str | None = None,
                 seed: int = 0) -> list[str]:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        out: list[str] = []
        while len(out) < n:  # some servers ignore n > 1: ask again for the rest
            body = self._post({"model": self.model, "messages": messages, "temperature": temperature,
                               "n": n - len(out), "max_tokens": self.max_tokens, "seed": seed + len(out)})
            choices = body.get("choices") or []
            if not choices:
                raise RuntimeError(f"{self.base_url}: response has no choices: {str(body)[:300]}")
            out.extend(str(c.get("message", {}).get("content", "")).strip() for c in choices)
        return out[:n]


class LocalLMGenerator(_LLM):
    """A causal LM from a Hugging Face folder (GPT-2 / LLaMA layout), loaded and decoded by nanomm."""

    name = "local"

    def __init__(self, path: str, *, max_new_tokens: int = 200, max_prompt_tokens: int | None = None):
        from tokenizers import Tokenizer

        from nanomm.models import from_hf

        self.model = from_hf(path)
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise FileNotFoundError(f"path: no tokenizer.json in {path!r}")
        self.tokenizer = Tokenizer.from_file(tok_file)
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.max_new_tokens = max_new_tokens
        limit = getattr(self.model.config, "max_positions", None) or 2048
        self.max_prompt_tokens = max_prompt_tokens or max(1, limit - max_new_tokens)
        vocab = self.tokenizer.get_vocab()
        self.eos = next((vocab[t] for t in ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>") if t in vocab), None)

    def generate_ids(self, ids: list[int], *, temperature: float = 0.0, seed: int = 0) -> list[int]:
        """Greedy (temperature 0) or softmax(logits / T) sampling with nanomm's KV-cache decoder
        (``nanomm.models.generation.generate``); stops at eos or max_new_tokens."""
        import torch

        from nanomm.models.generation import generate

        ids = ids[-self.max_prompt_tokens:]
        sampling = {"do_sample": True, "temperature": temperature, "seed": seed} if temperature > 0 else {}
        out = generate(self.model, torch.tensor([ids]), max_new_tokens=self.max_new_tokens,
                       eos_token_id=self.eos, **sampling)
        new = out.new_tokens[0].tolist()
        return new[: new.index(self.eos)] if self.eos in new else new

    def complete(self, prompt: str, *, n: int = 1, temperature: float = 0.0, system: str | None = None,
                 seed: int = 0) -> list[str]:
        text = f"{system}\n\n{prompt}" if system else prompt
        ids = self.tokenizer.encode(text).ids
        return [self.tokenizer.decode(self.generate_ids(ids, temperature=temperature, seed=seed + i)).strip()
                for i in range(n)]


GENERATORS: dict[str, Callable[..., object]] = {
    "extractive": ExtractiveGenerator,
    "local": LocalLMGenerator,
    "openai": OpenAIGenerator,
}


def make_generator(name: str = "extractive", **options):
    if name not in GENERATORS:
        raise ValueError(f"generator: expected one of {sorted(GENERATORS)}, got {name!r}")
    return GENERATORS[name](**options)
