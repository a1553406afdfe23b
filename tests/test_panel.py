"""The benchmark panel's folder sets: the sizes and class counts the quality table reports, the same every time."""

from __future__ import annotations

from pathlib import Path

from panel_datasets import build, counts  # benchmarks/, on pytest's pythonpath

REPO = Path(__file__).resolve().parent.parent


def test_digits_sets_have_their_sizes_and_are_the_same_every_time(tmp_path):
    few = counts(build("digits30", tmp_path))
    assert set(few["train"].values()) == {30} and set(few["val"].values()) == {50} and len(few["train"]) == 10
    tail = counts(build("digits_imbalanced", tmp_path))
    assert [tail["train"][str(k)] for k in range(10)] == [100, 60, 36, 22, 13, 8, 5, 5, 5, 5]
    first = sorted(p.name for p in (tmp_path / "digits30" / "train" / "3").iterdir())
    build("digits30", tmp_path)
    assert sorted(p.name for p in (tmp_path / "digits30" / "train" / "3").iterdir()) == first
    assert not list(tmp_path.glob(".*partial"))  # built aside, then moved in place
