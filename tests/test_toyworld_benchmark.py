"""The toy-world benchmark's edit breakdown (benchmarks/toyworld.py): each edit lands in the right kind and the
kinds pool every edit's samples, since the README quotes these tables."""

from __future__ import annotations

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
