"""benchmarks/toyworld_pool.py: runs of one protocol pool their concepts, each weighed by its samples and kept apart
from a namesake of another run; runs of different protocols, or of the same draw twice, are refused, since the
README quotes the pooled tables."""

from __future__ import annotations

import json

import pytest

from benchmarks import toyworld_pool as pool

ARGS = {"model": "toyworld", "images": "5", "steps": "600", "batch": "4", "lr": "0.02", "samples": "16",
        "init_reg": "3e-05", "init": "word", "shared": "['background', 'size']", "set": "{}", "concepts": "8"}
FIXED = {"shape": "triangle", "colour": "yellow", "pattern": "solid"}


def _run(seed: str, obeyed_1v: float, samples: int = 16, **args: str) -> dict:
    concepts = {"yellow_solid_triangle": {"fixed": FIXED, "unnamed": [], "shared": {"background": "blue"}}}
    per = {}
    for method, obeyed in (("tix-1v", obeyed_1v), ("tix-3v", 1.0)):
        per[f"yellow_solid_triangle|{method}"] = {
            "reconstruction": 1.0, "editability": obeyed, "samples": samples, "obeyed": obeyed,
            "resemblance": 1.0 if method == "tix-3v" else 0.5,
            "by_edit": {"a {} on a blue background": [round(obeyed * samples), samples]}}
    return {"args": {**ARGS, "draw": "32", "seed": seed, **args}, "concepts": concepts, "per_concept": per,
            "summary": {"tix-1v": {}, "tix-3v": {}}}


def _write(tmp_path, name: str, results: dict):
    (tmp_path / name).mkdir()
    (tmp_path / name / "results.json").write_text(json.dumps(results))
    return str(tmp_path / name)


def test_pooled_concepts_keep_their_runs_apart_and_weigh_by_samples(tmp_path, capsys):
    a = _write(tmp_path, "a", _run("2", 0.5, samples=16))
    b = _write(tmp_path, "b", _run("3", 1.0, samples=48))
    pool.main([a, b, "--out", str(tmp_path / "pooled")])
    out = capsys.readouterr().out
    assert "2 runs, 2 concepts (2 named, 0 unnamed), 64 samples of each kind for tix-1v" in out
    # tix-1v obeyed: (0.5 x 16 + 1.0 x 48) / 64 = 0.875, resemblance 0.5; tix-3v 1.00 on both.
    row = next(line for line in (tmp_path / "pooled" / "table.md").read_text().splitlines()
               if line.startswith("| tix-1v |"))
    assert row.split(" | ")[1:5] == ["1.00", "0.50", "0.88", "0.88"]
    trade = (tmp_path / "pooled" / "trade_off.md").read_text()
    assert "| tix-3v - tix-1v | named | 2 | +0.50 [+0.50, +0.50] | +0.12 [+0.00, +0.50] |" in trade
    edits = (tmp_path / "pooled" / "edits.md").read_text()
    assert "| a:yellow_solid_triangle | a * on a blue background |" in edits
    assert "| b:yellow_solid_triangle | a * on a blue background |" in edits
    assert (tmp_path / "pooled" / "scatter.png").stat().st_size > 0
    assert not (tmp_path / "pooled" / "leads.md").exists()


def test_pair_gives_a_lead_on_every_axis_and_names_methods_not_scored(tmp_path, capsys):
    a = _write(tmp_path, "a", _run("2", 0.5))
    b = _write(tmp_path, "b", _run("3", 0.75))
    pool.main([a, b, "--pair", "tix-1v", "tix-3v", "--out", str(tmp_path / "pooled")])
    leads = (tmp_path / "pooled" / "leads.md").read_text()
    # Equal samples: tix-1v obeyed 0.625 against 1.0, resemblance 0.5 against 1.0, reconstruction tied.
    assert "| tix-1v - tix-3v | named | 2 | +0.00 [+0.00, +0.00] | -0.38 [-0.50, -0.25] | -0.50 [-0.50, -0.50] |" \
        in leads
    assert leads in capsys.readouterr().out
    with pytest.raises(SystemExit):
        pool.main([a, b, "--pair", "tix-1v", "caption-long"])
    assert "--pair: caption-long not scored by every run" in capsys.readouterr().err


def test_runs_of_another_protocol_or_the_same_draw_are_refused(tmp_path, capsys):
    a = _write(tmp_path, "a", _run("2", 0.5))
    other = _write(tmp_path, "lr", _run("3", 0.5, lr="0.04"))
    again = _write(tmp_path, "again", _run("2", 0.5))
    with pytest.raises(SystemExit):
        pool.main([a, other])
    assert "followed different protocols (lr differ)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pool.main([a, again])
    assert "drew the same concepts" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pool.main([a, str(tmp_path / "missing")])
    assert "results.json: not found" in capsys.readouterr().err
