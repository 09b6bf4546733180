"""Atomic writes: the target is the old file or the new one, never a half-written one."""

import json

import pytest
import torch
from safetensors.torch import load_file

from nanomm.io import atomic_dir, atomic_path, write_json, write_safetensors, write_text


def test_write_replaces_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "a" / "x.json"
    write_json(target, {"v": 1})
    write_json(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 2}
    assert [p.name for p in target.parent.iterdir()] == ["x.json"]


def test_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "x.txt"
    write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_safetensors_with_tied_weights(tmp_path):
    w = torch.randn(3, 4)
    write_safetensors(tmp_path / "m.safetensors", {"embed": w, "head": w, "b": torch.zeros(2)})
    back = load_file(tmp_path / "m.safetensors")
    assert torch.equal(back["embed"], w) and torch.equal(back["head"], w)


def test_atomic_dir_replaces_whole_folder(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as d:
        (d / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as d:
            (d / "a").write_text("2")
            raise RuntimeError("killed")
    assert (target / "a").read_text() == "1"
    with atomic_dir(target) as d:
        (d / "b").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
