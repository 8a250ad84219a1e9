"""The toy-world benchmark's edit breakdown (benchmarks/toyworld.py): each edit lands in the right kind and the
kinds pool every edit's samples, since the README quotes these tables."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import toyworld as bench
from tix.toyworld import evaluate, world


def test_edit_kinds_and_their_pooled_shares():
    circle = next(c for c in world.benchmark_concepts() if c.name == "blue_dotted_circle")
    heart = next(c for c in world.benchmark_concepts() if c.name == "red_heart")
    context = {"background": "green", "size": "large"}
    kind = bench.edit_kind
    assert kind({"background": "green"}, context) == "repeats the images' context"
    assert kind({"size": "small", "background": "blue"}, context) == "a word objects also take"
    assert kind({"background": "white"}, context) == "other" and kind({"size": "small"}, context) == "other"
    assert kind({"background": "blue"}, {}) == "a word objects also take"

    # The circle obeys every blue-background edit 1 time in 4 and all else; the heart (unnamed) obeys everything.
    def score(concept: world.Concept, broken: bool) -> evaluate.Score:
        edits = {e: ((1, 4) if broken and "blue" in e else (4, 4)) for e, _ in world.edit_prompts(concept, "{}")}
        return evaluate.Score(1.0, 1.0, 4, 1.0, 1.0, edits)

    blue = [e for e, o in world.edit_prompts(circle, "{}") if o.get("background") == "blue"]
    scores = {("blue_dotted_circle", "m"): score(circle, True), ("red_heart", "m"): score(heart, False)}
    table = bench.edit_table(scores, [circle, heart], ["m"], {"blue_dotted_circle": context, "red_heart": {}})
    rows = {tuple(cell.strip() for cell in line.split("|")[1:3]): line.split("|")[3].strip()
            for line in table.split("\n\n")[0].splitlines()[2:]}
    assert rows["named", "a word objects also take"] == f"0.25 ({4 * len(blue)})"
    assert rows["unnamed", "a word objects also take"].startswith("1.00")
    # The heart's images share nothing, so its green-background edits count here too.
    coloured = sum(1 for _, o in world.edit_prompts(heart, "{}") if o.get("background") in ("blue", "green"))
    assert rows["all", "a word objects also take"] == (
        f"{(len(blue) + 4 * coloured) / (4 * (len(blue) + coloured)):.2f} ({4 * (len(blue) + coloured)})")
    assert rows["named", "other"].startswith("1.00") and rows["named", "repeats the images' context"].startswith("1.00")
    # Then one row per edit of each concept, the phrase written as "*".
    assert "| blue_dotted_circle | a * on a blue background | a word objects also take | 0.25 (4) |" in table


def test_trade_off_leads_come_with_an_interval_over_concepts():
    concepts = world.sample_concepts(3, 3, seed=0)

    def score(resemblance: float, obeyed: float) -> evaluate.Score:
        return evaluate.Score(resemblance, 0.5, 16, obeyed, resemblance)

    # Three vectors resemble more in every concept; they obey less in one concept only, by a lot.
    scores = {}
    for i, c in enumerate(concepts):
        scores[c.name, "tix-1v"] = score(0.5, 1.0)
        scores[c.name, "tix-3v"] = score(0.8, 0.4 if i == 0 else 1.0)
    lead, low, high = bench.concept_bootstrap(scores, concepts, "tix-3v", "tix-1v", "resemblance")
    assert (lead, low, high) == pytest.approx((0.3, 0.3, 0.3))
    lead, low, high = bench.concept_bootstrap(scores, concepts, "tix-3v", "tix-1v", "obeyed")
    assert lead == pytest.approx(-0.1) and low < -0.1 and high == pytest.approx(0.0)
    # Pooling weighs each concept by its samples, as the tables do.
    scores[concepts[0].name, "tix-3v"] = evaluate.Score(0.8, 0.5, 48, 0.4, 0.8)
    assert bench.concept_bootstrap(scores, concepts, "tix-3v", "tix-1v", "obeyed")[0] == pytest.approx(-0.6 * 48 / 128)

    table = bench.trade_off_table(scores, concepts)
    rows = table.splitlines()[2:]
    assert [r.split("|")[1:3] for r in rows] == [[" tix-3v - tix-1v ", f" {g} "] for g in ("named", "unnamed", "all")]
    assert "| tix-3v - tix-1v | all | 6 | +0.30 [+0.30, +0.30] |" in table  # no regularised run: no second pair
    # A group with no concepts gets no row (and no 0/0).
    named = concepts[:3]
    assert [r.split("|")[2].strip() for r in bench.trade_off_table(scores, named).splitlines()[2:]] == ["named", "all"]


def test_only_keeps_each_concepts_seed_and_names_unknown_concepts(capsys, tmp_path):
    concepts = world.sample_concepts(2, 2, seed=5)
    seeds = bench.concept_seeds(concepts, 5)
    assert [seeds[c.name] for c in concepts] == [5, 6, 7, 8]  # a rerun of the fourth alone still renders with 8
    with pytest.raises(SystemExit):
        bench.main(["--draw", "4", "--seed", "5", "--only", "nope", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "--only: no concept named nope" in err and concepts[3].name in err
    assert not (tmp_path / "out").exists()


def test_set_reaches_every_run_and_a_methods_own_setting_wins_and_the_log_counts_waves(monkeypatch, capsys, tmp_path):
    import argparse
    import types

    import train.config
    import train.invert

    seen = {}

    def fake_run(cfg, progress=True):
        seen[Path(cfg.out).name] = cfg
        return types.SimpleNamespace(vectors={}, tokens=["<a>", "<b>", "<c>"], compile_seconds=0.0, final_loss=0.0,
                                     waves=2)

    monkeypatch.setattr(train.invert, "run", fake_run)
    concepts = world.sample_concepts(1, 0, seed=3)
    args = argparse.Namespace(methods=["tix-1v", "tix-1v-regularised"], reuse=False, images=2, repeats=1, shared=[],
                              init="word", steps=8, batch=2, lr=0.01, seed=3, init_reg=1e-4,
                              set=train.config.parse_set(["lr_schedule=cosine", "init_reg=0.5"]))
    bench.invert("toyworld", concepts, bench.concept_seeds(concepts, 3), tmp_path, args)
    assert {name: (cfg.lr_schedule, cfg.init_reg) for name, cfg in seen.items()} == {
        "base": ("cosine", 0.5), "regularised": ("cosine", 1e-4)}
    assert "run base: 3 tokens in 2 waves, 8 steps each" in capsys.readouterr().out

    with pytest.raises(SystemExit):
        bench.main(["--set", "lr_shedule=cosine", "--out", str(tmp_path / "out")])
    assert "unknown config field 'lr_shedule'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the benchmark's own flag, not --set, moves the rate its variants scale
        bench.main(["--set", "lr=0.5", "--out", str(tmp_path / "out")])
    assert "--set lr: the benchmark sets it itself; use --lr" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_caption_start_is_written_for_named_concepts_only(tmp_path):
    import yaml

    named = next(c for c in world.benchmark_concepts() if c.nameable)
    unnamed = next(c for c in world.benchmark_concepts() if not c.nameable)
    seeds = {named.name: 0, unnamed.name: 1}
    for init, expected in (("word", (named.initializer, unnamed.initializer)),
                           ("caption", (named.best_caption(), unnamed.initializer))):
        bench.write_concepts(tmp_path / init, [named, unnamed], ["tix-1v"], 2, seeds, init=init)
        written = tuple(yaml.safe_load((tmp_path / init / f"{c.name}@tix-1v" / "concept.yaml").read_text())["init"]
                        for c in (named, unnamed))
        assert written == expected
    assert named.best_caption().split()[-1] == named.initializer  # the caption is more than the start word
    assert len(named.best_caption().split()) > 2
