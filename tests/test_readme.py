"""The README's commands are the ones CI runs: a newcomer's copy-paste is what gets tested."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith("python3 -m venv")]


def test_ci_runs_the_readme_test_command():
    readme = _commands((ROOT / "README.md").read_text(encoding="utf-8"))
    ci = _commands((ROOT / ".ci" / "run").read_text(encoding="utf-8"))
    assert len(readme) == 2, f"the README should show exactly two set-up-and-run commands, found {readme}"
    assert ci == [readme[1]], f".ci/run runs {ci}, the README's test command is {readme[1]!r}"
    assert "nanomm tour" in readme[0] and "pytest" in readme[1]


def test_torch_is_pinned_to_the_cpu_build_in_both_commands():
    for cmd in _commands((ROOT / "README.md").read_text(encoding="utf-8")):
        assert "torch==2.13.0" in cmd, cmd
