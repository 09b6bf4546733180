"""Prompt assembly and the generators: extractive, an OpenAI-compatible endpoint, a local causal LM."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from nanomm.rag.generate import ABSTAIN, ExtractiveGenerator, OpenAIGenerator, build_prompt, make_generator, strip_citations


def test_prompt_numbers_the_sources_and_follows_the_question_language(bm25_index):
    hits = bm25_index.search("BM25 and dense retrieval", 2, "bm25")
    assert len(hits) == 2
    en = build_prompt("What is k1?", hits)
    assert en.startswith("Sources:") and "[1] (" in en and "[2] (" in en and en.endswith("Question: What is k1?\nAnswer:")
    assert hits[0].chunk.text in en
    zh = build_prompt("什么是 k1？", hits)
    assert zh.startswith("资料：") and zh.endswith("问题：什么是 k1？\n答案：")
    assert len(build_prompt("q", hits, max_chars=10)) < len(en)  # the sources are cut to the budget


@pytest.mark.parametrize("index_name", ["dense_index", "bm25_index"])
def test_extractive_quotes_source_sentences_with_their_citation(request, index_name):
    ix = request.getfixturevalue(index_name)
    question = "Does RMSNorm subtract the mean?"
    hits = ix.search(question, 3, "bm25")
    (answer,) = ExtractiveGenerator().answer(question, hits, ix)
    assert "[" in answer
    for part in answer.split("] "):
        sentence, n = strip_citations(part + "]" if not part.endswith("]") else part), int(part.rsplit("[", 1)[1].rstrip("]"))
        assert sentence in hits[n - 1].chunk.text  # a verbatim quote of the cited chunk
    assert "subtract the mean" in answer


def test_extractive_sampling_varies_with_temperature_and_is_seeded(dense_index):
    q = "What is BM25?"
    hits = dense_index.search(q, 3, "hybrid")
    gen = ExtractiveGenerator(max_sentences=1)
    cold = gen.answer(q, hits, dense_index, n=6, temperature=0.0)
    assert len(set(cold)) == 1
    hot = gen.answer(q, hits, dense_index, n=12, temperature=5.0, seed=1)
    assert len(set(hot)) > 1
    assert hot == gen.answer(q, hits, dense_index, n=12, temperature=5.0, seed=1)


class _Handler(BaseHTTPRequestHandler):
    requests: list = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Handler.requests.append((self.path, dict(self.headers), body))
        if body["model"] == "broken":
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b"model exploded")
            return
        # like servers that ignore n: always one choice, echoing the request number
        reply = {"choices": [{"message": {"role": "assistant", "content": f"answer {len(_Handler.requests)} [1]"}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    _Handler.requests.clear()
    srv = HTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


def test_openai_endpoint(server, bm25_index, monkeypatch):
    monkeypatch.setenv("NANOMM_TEST_KEY", "sk-test")
    gen = make_generator("openai", base_url=server + "/", model="tiny", api_key_env="NANOMM_TEST_KEY")
    hits = bm25_index.search("k1", 2, "bm25")
    out = gen.answer("What is k1?", hits, n=3, temperature=0.5)
    assert out == ["answer 1 [1]", "answer 2 [1]", "answer 3 [1]"]  # asked again until n answers came back
    path, headers, body = _Handler.requests[0]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer sk-test"
    assert body["model"] == "tiny" and body["temperature"] == 0.5 and body["n"] == 3
    assert body["messages"][0]["role"] == "system" and "I don't know" in body["messages"][0]["content"]
    assert hits[0].chunk.text in body["messages"][1]["content"]
    assert [r[2]["n"] for r in _Handler.requests] == [3, 2, 1]
    with pytest.raises(RuntimeError, match="HTTP 500: model exploded"):
        OpenAIGenerator(server, "broken").complete("hi")


@pytest.mark.parametrize("kwargs, match", [({"base_url": "ftp://x", "model": "m"}, "base_url"), ({"base_url": "http://x", "model": ""}, "model")])
def test_openai_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OpenAIGenerator(**kwargs)


def test_local_lm_greedy_equals_transformers(tmp_path):
    """A random tiny GPT-2 saved by transformers, loaded by nanomm: greedy continuations are the same ids."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<|endoftext|>"] + [f"w{i}" for i in range(63)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=2, eos_token_id=0, bos_token_id=0)
    ref = transformers.GPT2LMHeadModel(cfg).eval()
    ref.save_pretrained(tmp_path)
    gen = make_generator("local", path=str(tmp_path), max_new_tokens=12)
    prompt = [5, 9, 17, 3]
    ours = gen.generate_ids(prompt)
    with torch.no_grad():
        theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0)[0, 4:].tolist()
    if 0 in theirs:
        theirs = theirs[: theirs.index(0)]  # transformers keeps the eos; nanomm stops before it
    assert ours == theirs
    text = gen.complete("w5 w9", n=2, temperature=1.0)
    assert len(text) == 2 and all(isinstance(t, str) for t in text)


def test_abstain_phrases():
    assert ABSTAIN == {"en": "I don't know.", "zh": "我不知道。"}
    with pytest.raises(ValueError, match="generator"):
        make_generator("oracle")
