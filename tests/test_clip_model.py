"""tix.load_clip against transformers' CLIPModel + CLIPImageProcessor (random weights, saved with save_pretrained)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.tiny import WORDS

# The real towers' widths (openai/clip-vit-base-patch32 and clip-vit-large-patch14 config.json); parity runs them at
# two layers to stay fast, the coverage test at full depth on the meta device.
TEXT_B = dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_hidden_layers=12)
TEXT_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12)
VISION_B = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, patch_size=32,
                image_size=224)
VISION_L = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                patch_size=14, image_size=224)
REAL = {"vit-b-32": (TEXT_B, VISION_B, 512), "vit-l-14": (TEXT_L, VISION_L, 768)}
SHAPES = {
    **REAL,
    "small": (dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, hidden_act="gelu"),
              dict(hidden_size=48, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, patch_size=8,
                   image_size=32), 24),
}


def clip_config(name: str, vocab_size: int = 49408, layers: int | None = None):
    from transformers import CLIPConfig

    text, vision, projection = SHAPES[name]
    if layers is not None:
        text, vision = {**text, "num_hidden_layers": layers}, {**vision, "num_hidden_layers": layers}
    # eos_token_id 2: the legacy value the openai checkpoints carry.
    return CLIPConfig(text_config=dict(text, vocab_size=vocab_size, max_position_embeddings=77, eos_token_id=2),
                      vision_config=vision, projection_dim=projection)


def build_clip(name: str, folder, layers: int | None = 2, seed: int = 0):
    """A random CLIPModel of shape `name` saved like an openai/clip-vit-* repository (weights, tokenizer,
    preprocessor_config.json); returns the folder and the torch model."""
    import torch
    from transformers import CLIPImageProcessor, CLIPModel

    from tix.tokenizer import write_clip_tokenizer

    vocab = write_clip_tokenizer(folder, WORDS + ["moon", "elmo", "holding"])
    torch.manual_seed(seed)
    model = CLIPModel(clip_config(name, vocab, layers)).eval()
    with torch.no_grad():  # random init leaves logit_scale and the class token at constants; spread them out
        model.vision_model.embeddings.class_embedding.normal_()
    model.save_pretrained(folder)
    size = model.config.vision_config.image_size
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(folder)
    return folder, model


def _images(rng: np.random.Generator, size: int) -> list[np.ndarray]:
    # Taller, wider, smaller than the crop (upsampled) and exactly the crop size.
    shapes = [(size * 3 // 2, size + 7), (size - 5, size * 2), (size // 2 + 3, size // 2), (size, size)]
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]


@pytest.mark.parametrize("name", list(SHAPES))
def test_features_match_transformers(name, tmp_path):
    import torch
    from transformers import CLIPImageProcessor, CLIPTokenizer

    import tix
    from tix.clip_model import preprocess

    folder, model = build_clip(name, tmp_path)
    clip = tix.load_clip(folder)
    processor = CLIPImageProcessor.from_pretrained(folder)
    images = _images(np.random.default_rng(0), model.config.vision_config.image_size)

    want_pixels = processor(images=images, return_tensors="np")["pixel_values"]
    got_pixels = preprocess(images, clip.image_spec)
    np.testing.assert_allclose(got_pixels, want_pixels.transpose(0, 2, 3, 1), atol=1e-6, rtol=0)

    texts = ["a photo of a cat", "an oil painting of a dog on the moon", "elmo holding a red toy", ""]
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    with torch.no_grad():
        want_img = model.get_image_features(pixel_values=torch.from_numpy(want_pixels)).pooler_output.numpy()
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        want_txt = model.get_text_features(**batch).pooler_output.numpy()
    got_img, got_txt = clip.encode_images(images, batch_size=3), clip.encode_texts(texts)
    scale = max(np.abs(want_img).max(), np.abs(want_txt).max())
    err_img, err_txt = np.abs(got_img - want_img).max(), np.abs(got_txt - want_txt).max()
    print(f"{name}: image features max-abs {err_img:.2e}, text {err_txt:.2e} (feature scale {scale:.2f})")
    assert got_img.shape == want_img.shape and got_txt.shape == want_txt.shape
    assert err_img <= 1e-4 and err_txt <= 1e-4


@pytest.mark.parametrize("name", list(REAL))
def test_every_tensor_of_the_real_checkpoints_maps(name):
    import torch
    from transformers import CLIPModel

    from tix.models.clip_vision import TORCH_IGNORE, CLIPConfig, abstract_params
    from tix.weights import expected_torch_keys

    config = clip_config(name, layers=None)
    with torch.device("meta"):
        model = CLIPModel(config)
    import re

    want = {k: tuple(v.shape) for k, v in model.state_dict().items()
            if not any(re.fullmatch(p, k) for p in TORCH_IGNORE)}
    got = expected_torch_keys(abstract_params(CLIPConfig.from_transformers(config.to_dict())))
    assert got == want


def test_errors_name_the_problem(tmp_path):
    import tix
    from tix.errors import CheckpointError, ConfigError

    with pytest.raises(CheckpointError, match="config.json is missing"):
        tix.load_clip(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip", "architectures": ["SiglipModel"]}))
    with pytest.raises(ConfigError, match="CLIPModel"):
        tix.load_clip(tmp_path)
    with pytest.raises(CheckpointError, match="Hub id"):
        tix.load_clip(tmp_path / "nothing-here")
