"""report.html shows a run without opening a file: training images, each validation column's prompt, per-concept
loss curves, time and images/s, each token's vector norm, the eval figures and the resolved config."""

from __future__ import annotations

import json

import numpy as np
import yaml
from PIL import Image

from train.config import TrainConfig
from train.report import grid, loss_curve, timing, write_html


def _run_folder(tmp_path, with_eval: bool):
    concepts = tmp_path / "concepts"
    rng = np.random.default_rng(0)
    for name, count in (("cat", 3), ("dog", 2)):
        (concepts / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(concepts / name / f"{i}.png")
    run = tmp_path / "run"
    (run / "validation" / "step-000010").mkdir(parents=True)
    cfg = TrainConfig(concepts=str(concepts), out=str(run), steps=20, lr=1e-3,
                      validation_prompts=["a photo of {}", "{} on the moon"])
    (run / "config.yaml").write_text(cfg.to_yaml())
    lines = [{"step": s, "time": 1000.0 + 2 * s, "loss": 0.5 / s, "images_per_s": 4.0 + s / 10,
              "loss/cat": 0.4 / s, "loss/dog": 0.6 / s,
              "norm_vs_words/cat": 2.0 + s / 10} for s in range(1, 21)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    for token in ("cat", "dog"):
        grid(rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8), 2).save(run / "validation" / "step-000010" /
                                                                           f"{token}.png")
    if with_eval:
        results = [{"concept": "<cat>", "phrase": "<cat>", "image_similarity": 0.7812, "text_similarity": 0.2543,
                    "toyworld": {"reconstruction": 0.625, "editability": 0.5}}]
        (run / "eval.json").write_text(json.dumps({"model": "m", "clip": "c", "seconds": 3.0, "results": results,
                                                   "protocol": {"samples": 64, "sampler": "ddim", "steps": 50,
                                                                "guidance": 5.0}}))
    return run


def test_report_shows_the_run(tmp_path):
    run = _run_folder(tmp_path, with_eval=True)
    assert loss_curve(run) is not None
    page = write_html(run).read_text()
    for text in ("a photo of &lt;cat&gt;", "&lt;dog&gt; on the moon",  # every column's prompt, per concept
                 "20 steps in 38 s", "images/s", "learning rate 0.001 x 4 = 0.004",  # timing, effective lr
                 "0.781", "0.254", "0.625",  # eval figures
                 "lr: 0.001", "validation_prompts",  # the resolved config
                 "vectors 4.0x the norm of an ordinary word"):  # the last logged norm, not the first
        assert text in page, text
    assert '<div class=changed>lr: 0.001</div>' in page and "<div>batch_size: 4</div>" in page
    sources = [part.split("'")[0].split('"')[0] for part in page.replace('src="', "src='").split("src='")[1:]]
    thumbs = [s for s in sources if "/train-" in s]
    assert len(thumbs) == 5  # 3 + 2 training images, copied into the run folder
    assert all((run / s).is_file() for s in sources)
    assert Image.open(run / thumbs[0]).size[1] <= 96


def test_report_without_eval_or_metrics(tmp_path):
    run = _run_folder(tmp_path, with_eval=False)
    (run / "metrics.jsonl").unlink()
    page = write_html(run, "title", ["<cat>"], ["a photo of {}"]).read_text()
    assert "Evaluation" not in page and "images/s" not in page and "a photo of &lt;cat&gt;" in page
    assert yaml.safe_load((run / "config.yaml").read_text())["lr"] == 1e-3


def test_timing_reads_the_metrics():
    rows = [{"step": 10, "time": 5.0, "loss": 1.0, "images_per_s": 2.0},
            {"step": 20, "time": 9.0, "loss": 1.0, "images_per_s": 4.0}]
    assert timing(rows) == {"steps": 20.0, "seconds": 4.0, "images_per_s": 3.0, "last_images_per_s": 4.0}
    assert timing([]) == {}


def test_loss_curve_of_many_concepts_lays_out(tmp_path):
    # 48 concepts (a benchmark's three draws of 16): their legend would not fit, and matplotlib said so.
    import warnings

    names = [f"purple_dotted_star_tix-3v@{i}" for i in range(48)]
    rows = [{"step": s, "loss": 0.5 / s, **{f"loss/{n}": (1 + i / 48) / s for i, n in enumerate(names)}}
            for s in range(1, 41)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = loss_curve(tmp_path)
    assert not [w for w in caught if "layout" in str(w.message)], [str(w.message) for w in caught]
    assert Image.open(path).size == (700, 350)
