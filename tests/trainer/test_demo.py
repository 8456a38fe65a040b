"""trainer.demo: the shapes world is deterministic; the demo publishes two tasks once."""
from __future__ import annotations

import hashlib

from residual_store.stores import open_store
from trainer import demo


def digest(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.png"))}


def test_shapes_world_is_deterministic(tmp_path):
    a = demo.make_shapes_world(tmp_path / "a", classes=("circle", "cross"), domains=("photo", "sketch"),
                               per_class=2, size=24, seed=3)
    b = demo.make_shapes_world(tmp_path / "b", classes=("circle", "cross"), domains=("photo", "sketch"),
                               per_class=2, size=24, seed=3)
    assert set(a) == set(b) == {"photo", "sketch"}
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert len(digest(tmp_path / "a")) == 8


def test_demo_publishes_two_tasks_then_does_nothing(tmp_path, capsys, monkeypatch):
    # fewer steps than `make run` uses, to keep the test fast; the flow is the same
    flags = list(demo.DEMO_FLAGS)
    flags[flags.index("--iters-per-epoch") + 1] = "2"
    flags[flags.index("--batch-size") + 1] = "4"
    monkeypatch.setattr(demo, "DEMO_FLAGS", tuple(flags))
    store = tmp_path / "store"
    assert demo.main(["--store", str(store)]) == 0
    assert "not the method" in capsys.readouterr().out  # a user is told why answers look random
    assert sorted(t.task for t in open_store(str(store)).list_tasks()) == ["photo2sketch", "sketch2photo"]
    assert demo.main(["--store", str(store)]) == 0
    assert "already has 2 task(s)" in capsys.readouterr().out
