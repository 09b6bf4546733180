"""The tour runner: chapters in order, unbuilt ones reported as such, a broken one never hides."""

import json
import sys
import types

import pytest
from rich.console import Console

from nanomm.tour import TOPICS, Chapter, Claim, run_tour
from nanomm.tour.runner import NOT_IMPLEMENTED


def test_the_notes_have_19_topics_in_order():
    assert sorted(TOPICS) == list(range(1, 20))
    assert len({module for _, module in TOPICS.values()}) == 19


def test_claim_rejects_an_unknown_verdict():
    with pytest.raises(ValueError, match="verdict must be one of"):
        Claim("c", "n", "m", "maybe", "s")


@pytest.fixture
def fake_chapters(monkeypatch):
    """Install two throwaway chapter modules: one that works, one that raises."""
    def good(ctx):
        path = ctx.plot_path("good")
        path.write_bytes(b"\x89PNG")
        return Chapter(claims=[Claim("two", "2", str(1 + 1), "holds", "arithmetic")], demo={"x": 1.5, "overflow": float("inf")},
                       lines=["prose"], plots=[path])

    def bad(ctx):
        raise RuntimeError("boom")

    for name, fn in (("fake_good", good), ("fake_bad", bad)):
        mod = types.ModuleType(f"nanomm.tour.chapters.{name}")
        mod.run = fn
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setitem(TOPICS, 1, ("good one", "fake_good"))
    monkeypatch.setitem(TOPICS, 2, ("bad one", "fake_bad"))
    monkeypatch.setitem(TOPICS, 3, ("missing one", "fake_missing"))


def test_report_files_and_statuses(fake_chapters, tmp_path):
    reports = run_tour([1, 2, 3], out=tmp_path, console=Console(file=open("/dev/null", "w")))
    assert [r.status for r in reports] == ["ok", "error", NOT_IMPLEMENTED]
    assert "boom" in reports[1].error
    data = json.loads((tmp_path / "report.json").read_text())
    first = data["topics"][0]
    assert first["id"] == 1 and first["title"] == "good one"
    assert first["claims"] == [{"claim": "two", "notes": "2", "nanomm": "2", "verdict": "holds", "source": "arithmetic"}]
    assert first["demo"] == {"x": 1.5, "overflow": "inf"} and first["plots"] == ["good.png"]
    md = (tmp_path / "report.md").read_text()
    assert "| two | 2 | 2 | holds | arithmetic |" in md and "![good](good.png)" in md
    assert f"*{NOT_IMPLEMENTED}*" in md


def test_unknown_topic_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"topic: expected ids in 1..19, got \[20\]"):
        run_tour([20], out=tmp_path)
