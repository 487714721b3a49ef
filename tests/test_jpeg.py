"""JPEG (in)compressibility against Flow-GRPO-MS's formulas: an RGB JPEG of quality 95 (Pillow), its
size in KiB, max(0, 1 - size / 256) and one minus it; float arrays made 8-bit as the fork's
array_to_images does (round(x * 255), clipped)."""

import io

import numpy as np
import pytest

from helpers import import_extra

Image = import_extra("PIL.Image", "pillow", "images")

import mindspore as ms  # noqa: E402

from ms_rm import ConfigError, InputError, MultiScorer, SCORERS  # noqa: E402
from ms_rm.scoring.jpeg import JpegCompressibilityScorer, JpegIncompressibilityScorer  # noqa: E402


def _fork_compressibility(image, max_size=256):
    """The fork's formula, for one PIL image, computed here directly."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=95)
    return max(0, 1 - buffer.tell() / 1024 / max_size)


def _images(rng):
    noise = Image.fromarray(rng.integers(0, 256, (560, 560, 3), dtype=np.uint8))          # > 256 KiB as a JPEG
    smooth = Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (48, 1)))  # mode L
    rgba = Image.fromarray(rng.integers(0, 256, (37, 53, 4), dtype=np.uint8), "RGBA")
    palette = smooth.convert("P")
    return [noise, smooth, rgba, palette]


def test_pil_images_of_every_mode_score_as_the_fork():
    images = _images(np.random.default_rng(0))
    expected = [_fork_compressibility(image) for image in images]
    assert JpegCompressibilityScorer()(images) == expected
    assert expected[0] == 0 and 0 < expected[1] < 1                 # clamped at 0; a small file near 1
    assert JpegIncompressibilityScorer()(images) == [1 - e for e in expected]
    assert JpegCompressibilityScorer(max_size=1024)(images[:1]) == [_fork_compressibility(images[0], 1024)]


def test_float_batches_become_8_bit_as_the_fork_makes_them():
    rng = np.random.default_rng(1)
    batch = rng.random((3, 40, 24, 3)).astype(np.float32)            # NHWC in [0, 1]
    fork_images = [Image.fromarray(x) for x in (batch * 255).round().clip(0, 255).astype(np.uint8)]
    expected = [_fork_compressibility(image) for image in fork_images]
    scorer = JpegCompressibilityScorer()
    assert scorer(batch) == expected
    assert scorer(ms.Tensor(batch.transpose(0, 3, 1, 2))) == expected      # the trainer's (B, 3, H, W) tensor
    assert scorer([x for x in batch]) == expected


def test_registered_and_weighted_in_multiscorer():
    assert SCORERS["jpeg-compressibility"] is JpegCompressibilityScorer
    assert SCORERS["jpeg-imcompressibility"] is JpegIncompressibilityScorer      # the fork's spelling
    images = _images(np.random.default_rng(2))[1:]
    out = MultiScorer({"jpeg-compressibility": 0.5, "jpeg-imcompressibility": 0.25})(images)
    assert out["avg"] == [0.5 * c + 0.25 * i for c, i in zip(out["jpeg-compressibility"], out["jpeg-imcompressibility"])]


def test_bad_input_gets_one_line_errors():
    with pytest.raises(ConfigError, match="max_size must be a positive number"):
        JpegCompressibilityScorer(max_size=0)
    with pytest.raises(InputError, match=r"images\[0\]: float images must lie in \[0, 1\]"):
        JpegCompressibilityScorer()(np.full((1, 8, 8, 3), 2.0, np.float32))
    with pytest.raises(InputError, match="images must be a list of images or a batch array"):
        JpegCompressibilityScorer()("not an image")
