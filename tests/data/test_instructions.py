"""Instruction and preference sets: deterministic, disjoint splits, checkers that separate chosen from
rejected, loss only on response tokens, packing that loses and duplicates nothing, dpo.py's pair format."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanomm.data import train_tokenizer
from nanomm.data.instructions import (IGNORE_INDEX, TASKS, Example, PreferenceBatches, SFTBatches, check_response,
                                      collate_packed, demonstrations, encode_example, encode_prompt, format_prompt,
                                      make_examples, pack_rows, prompt_batch, sft_rows)


@pytest.fixture(scope="module")
def tok():
    texts = [e.prompt + e.chosen + " " + e.rejected for e in make_examples("train") + make_examples("heldout")]
    return train_tokenizer(texts, vocab_size=320)


def test_examples_are_deterministic_by_seed():
    assert make_examples("train", seed=3) == make_examples("train", seed=3)
    assert make_examples("heldout", seed=3) != make_examples("heldout", seed=4)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("task", list(TASKS))
def test_splits_are_disjoint_and_cover_every_prompt(task, seed):
    train = make_examples("train", tasks=[task], seed=seed)
    heldout = make_examples("heldout", tasks=[task], seed=seed)
    assert not {e.instruction for e in train} & {e.instruction for e in heldout}
    assert sorted(e.key for e in train + heldout) == sorted(TASKS[task].keys())
    assert len(heldout) == pytest.approx(0.2 * len(train + heldout), abs=1)


@pytest.mark.parametrize("task", list(TASKS))
def test_checker_accepts_chosen_and_rejects_rejected(task):
    examples = make_examples("train", tasks=[task]) + make_examples("heldout", tasks=[task])
    assert all(check_response(e, e.chosen) for e in examples)
    assert not any(check_response(e, e.rejected) for e in examples)
    assert all(e.chosen != e.rejected for e in examples)


@pytest.mark.parametrize("task,key,answer,ok", [
    ("add", (3, 4), " 7 ", True), ("add", (3, 4), "8", False), ("add", (3, 4), "7 apples", False),
    ("compare", (7, 3), "Yes", True), ("compare", (3, 7), "yes", False),
    ("capitals", ("old", "fox", "runs"), "FOX", True), ("capitals", ("old", "fox", "runs"), "Fox", False),
    ("one_word", ("old", "fox", "runs"), "fox.", True), ("one_word", ("old", "fox", "runs"), "the fox", False),
])
def test_checkers_judge_any_answer(task, key, answer, ok):
    assert check_response(Example(task, key, "?", "", ""), answer) is ok


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 1.0])
def test_mixed_demonstrations_swap_that_share_of_each_task(fraction):
    examples = make_examples("train", tasks=["add", "compare"])
    demos = demonstrations(examples, rejected_fraction=fraction, seed=1)
    assert demos == demonstrations(examples, rejected_fraction=fraction, seed=1)
    for task in ("add", "compare"):
        pairs = [(e, d) for e, d in zip(examples, demos) if e.task == task]
        swapped = [(e, d) for e, d in pairs if d.chosen != e.chosen]
        assert len(swapped) == round(fraction * len(pairs))
        assert all((d.chosen, d.rejected) == (e.rejected, e.chosen) and d.key == e.key for e, d in swapped)
    with pytest.raises(ValueError, match="rejected_fraction"):
        demonstrations(examples, rejected_fraction=1.5)


def test_response_tokens_carry_the_loss_and_the_prompt_is_masked(tok):
    ex = make_examples("train", tasks=["one_word"], limit=1)[0]
    (x, y), = sft_rows([ex], tok)
    ids, n_prompt = encode_example(ex, tok)
    assert x.tolist() == ids and ids[:n_prompt] == encode_prompt(ex, tok) and ids[-1] == tok.eos_id
    assert (y[:n_prompt - 1] == IGNORE_INDEX).all() and y[-1] == IGNORE_INDEX
    assert y[n_prompt - 1:-1].tolist() == ids[n_prompt:]  # the answer and its end-of-text
    assert tok.decode(y[n_prompt - 1:-1]) == ex.chosen


def test_sft_batches_are_right_padded(tok):
    batch = next(SFTBatches(make_examples("train", limit=3), tok, 5, shuffle=False))
    lengths = batch["attention_mask"].sum(-1)
    for row, n in enumerate(lengths.tolist()):
        assert batch["attention_mask"][row, :n].all() and not batch["attention_mask"][row, n:].any()
        assert (batch["input_ids"][row, n:] == tok.pad_id).all() and (batch["targets"][row, n:] == IGNORE_INDEX).all()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 20), min_size=1, max_size=30), st.integers(20, 40))
def test_packing_places_every_example_once_within_the_row_length(lengths, max_length):
    rows = pack_rows(lengths, max_length)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= max_length for r in rows)


def test_packed_rows_hold_the_same_tokens_with_restarting_positions(tok):
    examples = make_examples("train", tasks=["add", "compare"], limit=4)
    rows = sft_rows(examples, tok)
    packed = SFTBatches(examples, tok, 8, pack=True, max_length=64, shuffle=False)
    batch = next(iter(packed.epoch_batches()))
    assert batch["input_ids"].shape[1] == 64 and len(batch["input_ids"]) < len(examples)
    got = sorted(batch["targets"][batch["segment_ids"] > 0].tolist())
    assert got == sorted(t for _, y in rows for t in y.tolist())
    for r in range(len(batch["input_ids"])):
        seg, pos = batch["segment_ids"][r], batch["position_ids"][r]
        for s in seg.unique().tolist():
            if s:
                assert pos[seg == s].tolist() == list(range(int((seg == s).sum())))


def test_collate_packed_rejects_nothing_and_pads_with_segment_zero(tok):
    rows = sft_rows(make_examples("train", tasks=["add"], limit=2), tok)
    batch = collate_packed([rows], tok.pad_id, 64)
    n = sum(len(x) for x, _ in rows)
    assert (batch["segment_ids"][0, n:] == 0).all() and (batch["input_ids"][0, n:] == tok.pad_id).all()


def test_preference_batches_put_chosen_rows_first_with_labels_on_the_response_only(tok):
    examples = make_examples("train", tasks=["one_word", "add"], limit=2)
    batch = next(PreferenceBatches(examples, tok, 3, shuffle=False, index_base=10))
    B = 3
    assert batch["input_ids"].shape[0] == 2 * B and batch["index"].tolist() == [10, 11, 12]
    for b in range(B):
        ex = examples[b]
        n_prompt = len(encode_prompt(ex, tok))
        for row, answer in ((b, ex.chosen), (B + b, ex.rejected)):
            labels = batch["labels"][row]
            assert (labels[:n_prompt] == IGNORE_INDEX).all()
            scored = labels[labels != IGNORE_INDEX]
            assert tok.decode(scored) == answer and scored[-1] == tok.eos_id
            assert batch["input_ids"][row, :n_prompt].tolist() == encode_prompt(ex, tok)
            assert int(batch["attention_mask"][row].sum()) == n_prompt + len(scored)


def test_prompt_batch_is_left_padded(tok):
    examples = make_examples("train", tasks=["add", "one_word"], limit=1)
    batch = prompt_batch(examples, tok)
    for row, ex in enumerate(examples):
        p = encode_prompt(ex, tok)
        assert batch["input_ids"][row, -len(p):].tolist() == p and batch["attention_mask"][row, -1] == 1
        assert int(batch["attention_mask"][row].sum()) == len(p)


def test_template_is_alpaca_style():
    assert format_prompt("Say hi.") == "### Instruction:\nSay hi.\n### Response:\n"


@pytest.mark.parametrize("kwargs,message", [
    (dict(split="test"), "split: expected one of"),
    (dict(tasks=["poetry"]), "tasks: expected"),
    (dict(heldout_fraction=1.0), "heldout_fraction"),
    (dict(limit=0), "limit"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_examples(**kwargs)


def test_packing_needs_a_row_length(tok):
    with pytest.raises(ValueError, match="max_length"):
        SFTBatches(make_examples("train", limit=1), tok, 1, pack=True)
    with pytest.raises(ValueError, match="max_length: 5 is shorter"):
        pack_rows([3, 9], 5)
