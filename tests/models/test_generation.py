"""Generation: the KV cache changes nothing but speed, padding changes nothing, greedy = transformers,
the sampling filters follow their definitions (and transformers' warpers), stop tokens end rows."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanomm.models import GPTConfig, LlamaConfig, build, from_hf
from nanomm.models.generation import (LOGIT_TRANSFORMS, apply_temperature, generate, logit_transforms,
                                      top_k_filter, top_p_filter)

# float64 end to end: cached and uncached runs differ only in summation order (sdpa over a longer key
# axis, matmuls over more rows), ~1e-15 on logits of size ~1; 1e-10 leaves a wide margin yet would
# catch any wrong position, mask or cache entry (those move logits by ~1e-2 or more)
ATOL64 = 1e-10
VOCAB = 99
DECODERS = {  # name -> config: every position encoding, and LLaMA with grouped-query attention
    "gpt-learned": GPTConfig(vocab_size=VOCAB, max_positions=40, n_layer=2, n_head=4, dim=32, ff_dim=64,
                             dropout=0.0, position="learned"),
    "gpt-sinusoidal": GPTConfig(vocab_size=VOCAB, max_positions=40, n_layer=2, n_head=4, dim=32, ff_dim=64,
                                dropout=0.0, position="sinusoidal"),
    "gpt-alibi": GPTConfig(vocab_size=VOCAB, max_positions=40, n_layer=2, n_head=4, dim=32, ff_dim=64,
                           dropout=0.0, position="alibi"),
    "gpt-rope": GPTConfig(vocab_size=VOCAB, max_positions=40, n_layer=2, n_head=4, dim=32, ff_dim=64,
                          dropout=0.0, position="rope"),
    "llama-gqa": LlamaConfig(vocab_size=VOCAB, max_positions=40, n_layer=2, n_head=4, n_kv_head=2, dim=32,
                             ff_dim=64),
}


def _model(name: str, dtype=torch.float64):
    torch.manual_seed(0)
    model = build(DECODERS[name]).to(dtype).eval()
    with torch.no_grad():  # larger logits than the 0.02 init gives: greedy choices far from ties
        model.lm_head.weight.mul_(10.0)
    return model


def _left_padded(B: int = 3, T: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(B):
        mask[b, :2 * b] = 0  # row b has 2b pads on the left
    return ids.masked_fill(mask == 0, 0), mask


# ----------------------------------------------------------------------------- cache and padding

@pytest.mark.parametrize("name", list(DECODERS))
def test_cached_and_uncached_logits_equal_at_every_step(name):
    model = _model(name)
    ids, mask = _left_padded()
    runs = [generate(model, ids, mask, max_new_tokens=8, use_cache=c, output_logits=True) for c in (True, False)]
    assert len(runs[0].logits) == len(runs[1].logits) == 8
    for step, (a, b) in enumerate(zip(runs[0].logits, runs[1].logits)):
        assert torch.allclose(a, b, atol=ATOL64, rtol=0), f"step {step}: {(a - b).abs().max():.2e}"
    assert torch.equal(runs[0].sequences, runs[1].sequences)


@pytest.mark.parametrize("name", ["gpt-learned", "gpt-alibi", "llama-gqa"])
def test_sampling_with_a_seed_is_the_same_with_and_without_cache(name):
    model = _model(name)
    ids, mask = _left_padded()
    kw = dict(max_new_tokens=8, do_sample=True, temperature=0.9, top_k=20, top_p=0.95, seed=7)
    a, b = generate(model, ids, mask, **kw), generate(model, ids, mask, use_cache=False, **kw)
    assert torch.equal(a.sequences, b.sequences)


@pytest.mark.parametrize("name", ["gpt-learned", "gpt-sinusoidal", "gpt-alibi", "gpt-rope", "llama-gqa"])
def test_left_padded_batch_equals_each_prompt_alone(name):
    model = _model(name)
    ids, mask = _left_padded()
    batch = generate(model, ids, mask, max_new_tokens=6, output_logits=True)
    for b in range(ids.shape[0]):
        alone = generate(model, ids[b:b + 1, mask[b].bool()], max_new_tokens=6, output_logits=True)
        assert torch.equal(alone.new_tokens[0], batch.new_tokens[b])
        assert all(torch.allclose(x[0], y[b], atol=ATOL64, rtol=0) for x, y in zip(alone.logits, batch.logits))


def test_generated_logits_equal_one_full_forward_of_the_result():
    """Training (one forward over the whole text) and generation (step by step) are the same function."""
    model = _model("llama-gqa")
    ids, mask = _left_padded()
    out = generate(model, ids, mask, max_new_tokens=5, output_logits=True)
    full_mask = torch.cat([mask, torch.ones(3, 4, dtype=torch.long)], dim=1)
    with torch.no_grad():
        full = model(out.sequences[:, :-1], attention_mask=full_mask).logits  # (B, T + 4, V)
    steps = torch.stack(out.logits, dim=1)  # (B, 5, V): predictions made at the last 5 positions
    assert torch.allclose(full[:, -5:], steps, atol=ATOL64, rtol=0)


def test_stop_tokens_finish_rows_pad_them_and_end_the_loop():
    model = _model("gpt-learned")
    ids, mask = _left_padded()
    free = generate(model, ids, mask, max_new_tokens=10).new_tokens
    eos = int(free[1, 2])  # row 1 emits it as its 3rd new token
    out = generate(model, ids, mask, max_new_tokens=10, eos_token_id=[eos, 98], pad_token_id=0)
    new = out.new_tokens
    for b in range(3):
        hits = ((free[b] == eos) | (free[b] == 98)).nonzero()
        stop = int(hits[0]) if len(hits) else None
        if stop is None:
            assert not out.finished[b] and torch.equal(new[b], free[b, :new.shape[1]])
        else:
            assert out.finished[b]
            assert torch.equal(new[b, :stop + 1], free[b, :stop + 1])  # up to and including the stop token
            assert bool((new[b, stop + 1:] == 0).all())  # then padding
    if bool(out.finished.all()):
        assert new.shape[1] < 10  # the loop ended when the last row finished


def test_model_mode_is_restored_and_dropout_is_off_while_generating():
    torch.manual_seed(0)
    model = build(DECODERS["gpt-learned"].replace(dropout=0.5)).double().train()
    ids, mask = _left_padded()
    a, b = generate(model, ids, mask, max_new_tokens=4), generate(model, ids, mask, max_new_tokens=4)
    assert torch.equal(a.sequences, b.sequences) and model.training


# ----------------------------------------------------------------------------- transformers

@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_greedy_equals_transformers_generate_token_for_token(hf_tiny, name):
    folder, hf = hf_tiny(name)
    ours = from_hf(folder, dtype=torch.float64)
    ref = type(hf).from_pretrained(folder).double().eval()  # float64: no argmax near-tie can flip
    ids, mask = _left_padded(3, 8, seed=3)
    free = generate(ours, ids, mask, max_new_tokens=12).new_tokens
    eos = int(free[0, 4])  # some row stops early, the others go on: pad-after-finish is compared too
    ours_out = generate(ours, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    with torch.no_grad():
        theirs = ref.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=eos,
                              pad_token_id=0)
    assert torch.equal(ours_out.sequences, theirs)


def _hf_warper(name: str, value):
    tf = pytest.importorskip("transformers")
    return {"top_k": lambda: tf.TopKLogitsWarper(top_k=value), "top_p": lambda: tf.TopPLogitsWarper(top_p=value),
            "temperature": lambda: tf.TemperatureLogitsWarper(temperature=value)}[name]()


@pytest.mark.parametrize("name, value", [("top_k", 1), ("top_k", 5), ("top_k", 200), ("top_p", 0.1),
                                         ("top_p", 0.5), ("top_p", 0.9), ("top_p", 1.0), ("temperature", 0.7)])
def test_filters_equal_transformers_warpers(name, value):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(16, 100, generator=g) * 3
    ours = logit_transforms(**{name: value})
    got = scores
    for f in ours:
        got = f(got)
    want = _hf_warper(name, value)(None, scores.clone())
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert torch.allclose(got[~torch.isinf(got)], want[~torch.isinf(want)], atol=0, rtol=1e-6)


# ----------------------------------------------------------------------------- filter definitions

_logits = st.lists(st.floats(-20, 20, allow_nan=False), min_size=2, max_size=40, unique=True)


@settings(max_examples=60, deadline=None)
@given(values=_logits, k=st.integers(1, 50))
def test_top_k_keeps_exactly_the_k_largest(values, k):
    scores = torch.tensor(values, dtype=torch.float64)
    kept = ~torch.isinf(top_k_filter(scores, k))
    want = set(sorted(range(len(values)), key=lambda i: -values[i])[:k])  # unique values: no ties
    assert set(kept.nonzero().flatten().tolist()) == want


@settings(max_examples=60, deadline=None)
@given(values=_logits, p=st.floats(0.01, 1.0))
def test_top_p_keeps_the_smallest_prefix_reaching_p(values, p):
    scores = torch.tensor(values, dtype=torch.float64)
    probs = scores.softmax(-1)
    kept = ~torch.isinf(top_p_filter(scores, p))
    # direct definition: walk tokens from the most probable, stop once the mass taken reaches p
    order = sorted(range(len(values)), key=lambda i: -values[i])
    want, mass = set(), 0.0
    for i in order:
        if mass >= p:
            break
        want.add(i)
        mass += float(probs[i])
    got = set(kept.nonzero().flatten().tolist())
    # cumulative sums are rounded differently; a token sitting within 1e-12 of the edge may go either way
    edge = {i for i in order if abs(sum(float(probs[j]) for j in order[:order.index(i)]) - p) < 1e-12}
    assert got - edge == want - edge and len(got) >= 1


def test_temperature_divides_and_transforms_compose_in_table_order():
    scores = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    assert torch.equal(apply_temperature(scores, 0.5), scores * 2)
    assert list(LOGIT_TRANSFORMS) == ["temperature", "top_k", "top_p"]
    assert logit_transforms(temperature=1.0, top_k=None, top_p=1.0) == []  # "off" values are skipped
    both = logit_transforms(temperature=0.5, top_k=3, top_p=0.6)
    out = scores
    for f in both:
        out = f(out)
    # T = 0.5 → probs ∝ e^(4, 2, 0, −2); top-3 drops the last; the first alone already holds 0.87 ≥ 0.6
    assert torch.isinf(out).tolist() == [[False, True, True, True]]


def test_top_k_1_sampling_is_greedy_and_a_seed_repeats():
    model = _model("llama-gqa")
    ids, mask = _left_padded()
    greedy = generate(model, ids, mask, max_new_tokens=6)
    assert torch.equal(generate(model, ids, mask, max_new_tokens=6, do_sample=True, top_k=1, seed=3).sequences,
                       greedy.sequences)
    kw = dict(max_new_tokens=6, do_sample=True, temperature=2.0, seed=11)
    a, b = generate(model, ids, mask, **kw), generate(model, ids, mask, **kw)
    c = generate(model, ids, mask, **{**kw, "seed": 12})
    assert torch.equal(a.sequences, b.sequences) and not torch.equal(a.sequences, c.sequences)


def test_sampled_tokens_stay_inside_the_nucleus():
    model = _model("gpt-rope")
    ids, mask = _left_padded()
    out = generate(model, ids, mask, max_new_tokens=8, do_sample=True, top_p=0.5, seed=0, output_scores=True)
    for step, scores in enumerate(out.scores):
        chosen = out.new_tokens[:, step]
        assert not torch.isinf(scores.gather(1, chosen[:, None])).any()


def test_scores_and_on_token_report_every_step():
    model = _model("gpt-learned")
    ids, _ = _left_padded()
    seen = []
    out = generate(model, ids, max_new_tokens=5, output_scores=True, on_token=lambda n, t: seen.append((n, t)))
    assert [n for n, _ in seen] == [1, 2, 3, 4, 5] and len(out.scores) == 5
    assert torch.equal(torch.stack([t for _, t in seen], 1), out.new_tokens)


# ----------------------------------------------------------------------------- prefix embeddings

@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")  # transformers 5.x renames it `cache`
def test_inputs_embeds_prefix_gives_the_tokens_of_its_ids(hf_tiny):
    """A prefix of embeddings (BLIP-2, LLaVA) drives any model whose forward accepts inputs_embeds:
    here transformers' LLaMA; embedding the ids ourselves must give what the ids give."""
    _, hf = hf_tiny("llama")
    ids, mask = _left_padded(2, 6)
    embeds = hf.get_input_embeddings()(ids).detach()
    by_ids = generate(hf, ids, mask, max_new_tokens=5).new_tokens
    for cache in (True, False):
        by_embeds = generate(hf, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=5, use_cache=cache)
        assert by_embeds.prompt_length == 0 and torch.equal(by_embeds.sequences, by_ids)


# ----------------------------------------------------------------------------- validation

_IDS = torch.ones(2, 3, dtype=torch.long)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(input_ids=torch.ones(3)), ValueError, r"input_ids: expected integer ids of shape \(B, T\)"),
    (dict(input_ids=torch.ones(2, 3)), ValueError, "input_ids: expected integer ids"),
    (dict(), ValueError, "input_ids, inputs_embeds: expected exactly one of them.*neither"),
    (dict(attention_mask=torch.ones(2, 4)), ValueError, r"attention_mask: expected shape \(B, T\) = \(2, 3\)"),
    (dict(attention_mask=torch.tensor([[1, 1, 0], [1, 1, 1]])), ValueError, "attention_mask: expected LEFT padding"),
    (dict(attention_mask=torch.tensor([[2, 1, 1], [1, 1, 1]])), ValueError, "attention_mask: expected 0"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens: expected an int >= 1, got 0"),
    (dict(max_new_tokens=60), ValueError, "max_new_tokens: prompt length 3 \\+ 60 new tokens exceeds .* 40"),
    (dict(do_sample=True, temperature=0.0), ValueError, "temperature: expected a finite number > 0, got 0.0"),
    (dict(do_sample=True, top_k=0), ValueError, "top_k: expected a positive int, got 0"),
    (dict(do_sample=True, top_p=1.5), ValueError, r"top_p: expected a probability in \(0, 1\], got 1.5"),
    (dict(top_k=5), ValueError, "do_sample: greedy decoding ignores {'top_k': 5}"),
    (dict(temperature=0.7), ValueError, "do_sample: greedy decoding ignores {'temperature': 0.7}"),
    (dict(eos_token_id=VOCAB), ValueError, f"eos_token_id: expected a token id .* < vocab_size={VOCAB}, got {VOCAB}"),
    (dict(eos_token_id=[]), ValueError, "eos_token_id: expected a token id or a non-empty list"),
    (dict(pad_token_id=-1), ValueError, "pad_token_id: expected a token id"),
    (dict(seed=1, generator=torch.Generator()), ValueError, "seed, generator: expected at most one"),
    (dict(use_cache=1), TypeError, "use_cache: expected a bool, got int"),
    (dict(on_token=3), TypeError, "on_token: expected a callable"),
])
def test_arguments_are_validated_with_clear_messages(kwargs, error, match):
    model = _model("gpt-learned")
    kwargs = {"input_ids": _IDS, **kwargs} if kwargs else kwargs
    with pytest.raises(error, match=match):
        generate(model, **kwargs)


def test_model_must_be_a_module_and_filters_need_float_scores():
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        generate(lambda x: x, _IDS)
    with pytest.raises(TypeError, match="scores: expected a floating tensor"):
        top_k_filter(torch.ones(3, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="options: unknown \\['top_z'\\]"):
        logit_transforms(top_z=3)
    assert math.isinf(float(top_p_filter(torch.tensor([5.0, 0.0]), 0.5)[1]))


# ----------------------------------------------------------------------------- the CLI entry point

def _word_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"</s>": VOCAB - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    return tok


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from nanomm.models import to_hf

    folder = tmp_path_factory.mktemp("llama-cli")
    to_hf(_model("llama-gqa", torch.float32), folder)
    _word_tokenizer(folder)
    return folder


def test_generate_cli_greedy_equals_generate_and_streams_the_same_text(model_dir):
    from nanomm.models.cli_generate import generate_cli, load_decoder

    pieces = []
    text = generate_cli(model_dir, "w5 w17 w3", max_new_tokens=6, stream=pieces.append)
    model, tok, eos = load_decoder(model_dir)
    assert eos == [VOCAB - 1]  # "</s>" found in the vocabulary: the folder's config.json names no eos
    want = generate(model, torch.tensor([[5, 17, 3]]), max_new_tokens=6, eos_token_id=eos).new_tokens[0].tolist()
    want = want[:-1] if want[-1] in eos else want
    assert text == tok.decode(want) and "".join(pieces) == text and text


def test_generate_cli_sampling_repeats_with_a_seed_and_rejects_bad_options(model_dir):
    from nanomm.models.cli_generate import generate_cli

    kw = dict(max_new_tokens=6, temperature=1.5, top_k=20, seed=4)
    assert generate_cli(model_dir, "w5 w6", **kw) == generate_cli(model_dir, "w5 w6", **kw)
    with pytest.raises(ValueError, match="temperature: 0 means greedy"):
        generate_cli(model_dir, "w5", temperature=0, top_p=0.9)
    with pytest.raises(ValueError, match="prompt: expected a non-empty string"):
        generate_cli(model_dir, "")


def test_generate_cli_refuses_an_encoder(hf_tiny, tmp_path):
    from nanomm.models.cli_generate import generate_cli

    folder, _ = hf_tiny("bert")
    with pytest.raises(TypeError, match="model_dir: holds a BertForPreTraining, which does not generate"):
        generate_cli(folder, "w1")
