"""benchmarks/toyworld_pick.py: runs that drew different concepts are refused, and its table sets each group's
picked scores beside the first run's, the best-scored run's and the caption's, since the README quotes it."""

from __future__ import annotations

import json

import pytest

from benchmarks import toyworld_pick as bench


def _results(edit_a: float, edit_b: float) -> list[dict]:
    concepts = {"a": {"unnamed": []}, "b": {"unnamed": ["shape"]}}

    def one(edit: float) -> dict:
        per = {f"{n}|tix-1v": {"reconstruction": 1.0, "editability": edit} for n in concepts}
        per.update({f"{n}|caption-long": {"reconstruction": 0.5, "editability": 0.5} for n in concepts})
        return {"concepts": concepts, "per_concept": per}

    return [one(edit_a), one(edit_b)]


def test_the_table_scores_the_pick_beside_the_first_and_best_runs():
    lines = bench.table(_results(0.25, 0.75), {"a": 0, "b": 0}).splitlines()
    assert lines[2] == "| named | 1 | 1.00 / 0.25 | 1.00 / 0.25 | 1.00 / 0.75 | 0.50 / 0.50 |"
    assert lines[3] == "| unnamed | 1 | 1.00 / 0.25 | 1.00 / 0.25 | 1.00 / 0.75 | 0.50 / 0.50 |"
    assert bench.table(_results(0.25, 0.75), {"a": 1}).splitlines()[2].split(" | ")[3] == "1.00 / 0.75"


def test_runs_of_different_draws_are_refused(tmp_path, capsys):
    for name, seed in (("a", "2"), ("b", "3")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(
            {"args": {"model": "toyworld", "draw": "32", "seed": seed, "images": "5"}, "per_concept": {}}))
    with pytest.raises(SystemExit):
        bench.main([str(tmp_path / "a"), str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert "drew different concepts or images" in err and "(seed differ)" in err
