"""Concepts from TensorFlow Datasets: a tiny labelled dataset is generated and prepared in a temporary folder (no
download), written out as one concept folder per label, and inverted one concept per label."""

import functools
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tix.embedding_files import read
from tix.errors import ConfigError, TixError
from train.config import TrainConfig
from train.data import concept_specs, resolve_concept
from train.tfds_concepts import MARKER, folder_names, materialize, parse_spec

CLASSES = ["Red Square", "green/circle", "blue", "never seen"]  # the last has no example in any split
TRAIN = 8  # labels i % 3: classes 0 and 1 get 3 images each, class 2 gets 2
UNLABELLED = 99  # one more train example, labelled -1 as TFDS marks unlabelled ones


def picture(index: int) -> np.ndarray:
    """A 12x10 RGB image that identifies its example: every pixel differs between examples."""
    rng = np.random.default_rng(index)
    return rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)


@functools.cache
def builders():
    """The test's dataset builders, defined on first use so that collecting this file does not import TensorFlow."""
    import tensorflow_datasets as tfds

    class TixTinyShapes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Unregistered, as a dataset prepared elsewhere is: tfds.builder finds it by name in data_dir alone."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "thumb": tfds.features.Image(shape=(None, None, 1)),
                "label": tfds.features.ClassLabel(names=CLASSES),
                "shape": tfds.features.Text(),
                "index": tfds.features.Scalar(np.int64),
            }))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples([*range(TRAIN), UNLABELLED]),
                    "test": self._generate_examples(range(100, 103))}

        def _generate_examples(self, indices):
            for i in indices:
                label = -1 if i == UNLABELLED else i % 3
                yield i, {"image": picture(i), "thumb": picture(i)[:4, :4, :1], "label": label,
                          "shape": ["square", "circle", "dot"][i % 3], "index": i}


    class TixNoImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "value": tfds.features.Scalar(np.float32), "label": tfds.features.ClassLabel(names=["a", "b"])}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(2):
                yield i, {"value": float(i), "label": i}


    class TixUnprepared(tfds.core.GeneratorBasedBuilder):
        """Registered (tfds.builder knows its code) but never prepared."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(4, 4, 3)), "label": tfds.features.ClassLabel(names=["a"])}))

        def _split_generators(self, dl_manager):
            raise AssertionError("tix must never prepare (download) a dataset")

        def _generate_examples(self):
            raise AssertionError("unreachable")

    return TixTinyShapes, TixNoImages, TixUnprepared


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    for builder in builders()[:2]:
        builder(data_dir=str(root)).download_and_prepare(download_dir=str(root / "downloads"))
    return root


def read_pngs(folder):
    files = sorted(folder.glob("*.png"))
    return files, [np.asarray(Image.open(f)) for f in files]


def test_one_concept_folder_per_label(data_dir, tmp_path, caplog):
    out = materialize("tix_tiny_shapes:train", tmp_path / "concepts", images_per_concept=2, data_dir=data_dir)
    assert out == tmp_path / "concepts"
    # Class names made safe; the class with no example gets no folder (it could not be learned).
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["blue", "green-circle", "red-square"]
    for label, name in enumerate(["red-square", "green-circle", "blue"]):
        files, pixels = read_pngs(out / name)
        assert len(files) == 2
        # Each written image is, pixel for pixel, a distinct example of its own class.
        owners = [next(i for i in range(TRAIN) if np.array_equal(p, picture(i))) for p in pixels]
        assert len(set(owners)) == 2 and all(i % 3 == label for i in owners)
    record = json.loads((out / MARKER).read_text())
    assert record["concepts"]["green-circle"] == {"label": "green/circle", "images": 2}
    assert (record["dataset"], record["split"], record["image"]) == ("tix_tiny_shapes", "train", "image")

    # The folder is what --concepts reads: one token per label, its images found.
    cfg = TrainConfig(concepts=str(out), init="cat")
    specs = concept_specs(cfg)
    assert [s.token for s in specs] == ["<blue>", "<green-circle>", "<red-square>"]
    assert [len(resolve_concept(s, cfg).images) for s in specs] == [2, 2, 2]

    # More than a class holds: all of them; a second call rewrites its own folder (here with another split).
    with caplog.at_level(logging.WARNING, logger="tix"):
        materialize("tix_tiny_shapes:train", out, images_per_concept=10, data_dir=data_dir)
    assert [len(read_pngs(out / n)[0]) for n in ("red-square", "green-circle", "blue")] == [3, 3, 2]
    assert "skipped 1 example(s) of train without a label value" in caplog.text
    assert "no image in train and get no concept: never seen" in caplog.text
    materialize("tix_tiny_shapes:test", out, images_per_concept=10, data_dir=data_dir)
    assert [len(read_pngs(out / n)[0]) for n in ("red-square", "green-circle", "blue")] == [1, 1, 1]
    _, (test_pixels,) = read_pngs(out / "blue")
    np.testing.assert_array_equal(test_pixels, picture(101))  # 101 % 3 == 2: blue


def test_other_image_and_label_features(data_dir, tmp_path):
    # A grayscale image feature chosen by name; a text feature as the label (concepts named by its values).
    out = materialize("tix_tiny_shapes", tmp_path / "c", label="shape", image_key="thumb", images_per_concept=1,
                      data_dir=data_dir)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["circle", "dot", "square"]
    _, (pixels,) = read_pngs(out / "dot")
    assert pixels.shape == (4, 4)
    assert any(np.array_equal(pixels, picture(i)[:4, :4, 0]) for i in (2, 5))


def test_errors_say_what_to_do(data_dir, tmp_path):
    builders()  # registers tix_unprepared
    with pytest.raises(TixError, match=r"not found in .*tfds build no_such_set --data_dir"):
        materialize("no_such_set:train", tmp_path / "a", data_dir=tmp_path)
    with pytest.raises(TixError, match=r"'tix_unprepared' is not prepared .*never downloads.*tfds build tix_unpre"):
        materialize("tix_unprepared", tmp_path / "a", data_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"--label 'species'.*features are: image \(Image\), index \(Scalar\), "
                                          r"label \(ClassLabel\), shape \(Text\), thumb \(Image\)"):
        materialize("tix_tiny_shapes:train", tmp_path / "a", label="species", data_dir=data_dir)
    with pytest.raises(ConfigError, match=r"no image feature \(features: label, value\)"):
        materialize("tix_no_images:train", tmp_path / "a", data_dir=data_dir)
    with pytest.raises(ConfigError, match=r"image feature 'label' not found; image features: image, thumb"):
        materialize("tix_tiny_shapes:train", tmp_path / "a", image_key="label", data_dir=data_dir)
    with pytest.raises(ConfigError, match=r"split 'validation' .*splits: .*test"):
        materialize("tix_tiny_shapes:validation", tmp_path / "a", data_dir=data_dir)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty and was not written by --tfds"):
        materialize("tix_tiny_shapes:train", tmp_path / "mine", data_dir=data_dir)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_spec_and_folder_names():
    assert parse_spec("cifar10") == parse_spec("cifar10:train")
    assert parse_spec("mnist:3.0.1:test").dataset == "mnist:3.0.1"
    assert parse_spec("mnist:3.0.1:test").split == "test"
    assert parse_spec("imagenet2012/subset:train[:10%]").split == "train[:10%]"
    assert parse_spec("oxford_iiit_pet:3.*.*").split == "train"
    assert folder_names(["Cat", "cat", "", "Great White Shark", "a/b", "..x"]) == [
        "cat", "cat-1", "label-2", "great-white-shark", "a-b", "x"]


def test_invert_one_concept_per_label_through_the_cli(data_dir, tmp_path, tiny_dirs):
    from tix.cli import main

    main(["invert", "--model", str(tiny_dirs("sd1")), "--tfds", "tix_tiny_shapes:train", "--data-dir", str(data_dir),
          "--images-per-concept", "1", "--tfds-cache", str(tmp_path / "cache"), "--init", "cat",
          "--out", str(tmp_path / "run"), "--steps", "1", "--batch-size", "1", "--validate-every", "0",
          "--save-every", "1000"])
    concepts = tmp_path / "cache" / "tix_tiny_shapes_train"
    assert sorted(p.name for p in concepts.iterdir() if p.is_dir()) == ["blue", "green-circle", "red-square"]
    learned = {c.token: c for c in read(tmp_path / "run" / "embeddings")}
    assert sorted(learned) == ["<blue>", "<green-circle>", "<red-square>"]
    for concept in learned.values():
        assert np.isfinite(concept.vectors["text_encoder"]).all()


def test_tix_does_not_import_tensorflow():
    code = ("import sys, tix, tix.cli, train.invert, train.tfds_concepts; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_datasets')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
