"""Image preprocessing, grouping by size, and the scorers' image call with a stand-in encoder."""

from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
import mindspore as ms

from ms_rm import ConfigError, DiffusionRM, InputError
from ms_rm.cli.demo import TINY_SD35
from ms_rm.encoders import MindOneSD3Encoder
from ms_rm.scoring.images import group_by_size, load_image, preprocess
from ms_rm.scoring import DiffusionRMSD3Scorer


def test_pil_uint8_and_float_inputs_give_the_same_pixels_in_minus_one_to_one():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    rgba = Image.fromarray(np.dstack([rgb, np.full((32, 48), 7, np.uint8)]), mode="RGBA")
    expected = rgb.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0     # ToTensor + Normalize(0.5, 0.5)
    for image in (rgba, rgb, rgb.astype(np.float32) / 255, rgb.transpose(2, 0, 1).astype(np.float32) / 255):
        (pixels,) = preprocess([image])
        assert pixels.shape == (3, 32, 48) and pixels.dtype == np.float32
        np.testing.assert_allclose(pixels, expected, atol=1e-6)
    batch = preprocess(ms.Tensor(np.stack([rgb, rgb]).transpose(0, 3, 1, 2).astype(np.float32) / 255))
    assert len(batch) == 2
    np.testing.assert_allclose(batch[1], expected, atol=1e-6)


def test_crop_takes_the_centre_multiple_of_16():
    image = np.random.default_rng(1).random((37, 50, 3), dtype=np.float32)
    (pixels,) = preprocess([image], policy="crop")
    assert pixels.shape == (3, 32, 48)
    np.testing.assert_allclose(pixels, image[2:34, 1:49].transpose(2, 0, 1) * 2 - 1, atol=1e-6)


def test_resize_goes_to_the_nearest_multiple_and_keeps_a_flat_image_flat():
    (pixels,) = preprocess([np.full((37, 57, 3), 0.25, np.float32)], policy="resize")
    assert pixels.shape == (3, 32, 64)
    np.testing.assert_allclose(pixels, -0.5, atol=1e-5)


def test_bucket_resizes_to_the_64_pixel_grid_so_nearby_sizes_share_one_shape():
    from ms_rm.scoring.images import fitted_size

    shapes = {preprocess([np.full((h, w, 3), 0.25, np.float32)], policy="bucket")[0].shape
              for h, w in ((1000, 750), (1010, 760), (1024, 768), (1020, 740))}
    assert shapes == {(3, 1024, 768)}
    assert fitted_size(1000, 750, "bucket") == (1024, 768) and fitted_size(20, 20, "bucket") == (64, 64)
    assert fitted_size(1000, 750, "crop") == (992, 736) and fitted_size(1000, 750, "resize") == (992, 752)
    assert fitted_size(1000, 750, "error") == (1000, 750)
    (flat,) = preprocess([np.full((100, 130, 3), 0.25, np.float32)], policy="bucket")
    assert flat.shape == (3, 128, 128)
    np.testing.assert_allclose(flat, -0.5, atol=1e-5)


@pytest.mark.parametrize("image, policy, message", [
    (np.zeros((20, 32, 3), np.float32), "error", "20x32 pixels; the reward model needs multiples of 16"),
    (np.zeros((8, 32, 3), np.float32), "crop", "smaller than 16 pixels"),
    (np.full((16, 16, 3), 1.5, np.float32), "crop", r"must lie in \[0, 1\]"),
    (np.full((16, 16, 3), np.nan, np.float32), "crop", "NaN or Inf"),
    (np.zeros((16, 16), np.float32), "crop", r"must be \(H, W, 3\) or \(3, H, W\)"),
    (np.zeros((16, 16, 3), np.int64), "crop", "must be uint8 or float"),
    (np.zeros((16, 16, 3), np.float32), "stretch", "size policy must be one of"),
])
def test_bad_images_are_refused_with_the_reason(image, policy, message):
    with pytest.raises(InputError, match=message):
        preprocess([image], policy=policy)


def test_unreadable_image_files_name_the_file(tmp_path):
    with pytest.raises(InputError, match="missing.png: image file not found"):
        load_image(str(tmp_path / "missing.png"))
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:len(data) // 2])
    with pytest.raises(InputError, match="cut.png: cannot read the image"):
        load_image(str(tmp_path / "cut.png"))
    assert load_image(str(tmp_path / "ok.png")).size == (16, 16)


def test_group_by_size_keeps_the_order_of_first_appearance():
    shapes = [(3, 32, 32), (3, 16, 48), (3, 32, 32), (3, 16, 48), (3, 64, 16)]
    groups = group_by_size([np.zeros(s, np.float32) for s in shapes])
    assert list(groups.items()) == [((32, 32), [0, 2]), ((16, 48), [1, 3]), ((64, 16), [4])]


# --- the scorer's image call ---------------------------------------------------------------
class StandInEncoder:
    """A deterministic encoder: 8x8 average pooling of the pixels, tiled to 16 channels; prompt
    embeddings from the prompt's characters. Records the batches it is given."""

    def __init__(self):
        self.pixel_batches = []

    def encode_pixels(self, pixels):
        self.pixel_batches.append(pixels.shape)
        b, _, h, w = pixels.shape
        pooled = pixels.reshape(b, 3, h // 8, 8, w // 8, 8).mean(axis=(3, 5))
        return np.concatenate([pooled] * 5 + [pooled[:, :1]], axis=1).astype(np.float32)

    def encode_prompts(self, prompts):
        codes = np.array([[ord(c) for c in (p * 64)[:64]] for p in prompts], np.float32) / 128 - 0.5
        return np.repeat(codes[:, None, :], 6, axis=1), codes[:, :32]


@pytest.fixture(scope="module")
def model():
    return DiffusionRM(TINY_SD35).randomize(0)


def test_image_call_groups_sizes_and_scores_like_score_latents(model):
    encoder = StandInEncoder()
    scorer = DiffusionRMSD3Scorer(model=model, u=0.4, seed=3, noise="fixed", encoder=encoder)
    rng = np.random.default_rng(2)
    images = [rng.random((64, 64, 3), dtype=np.float32), rng.random((70, 48, 3), dtype=np.float32),
              rng.random((64, 64, 3), dtype=np.float32)]
    prompts = ["a red cube", "two cats", "a red cube on a table"]
    scores = scorer(images, prompts)
    assert encoder.pixel_batches == [(2, 3, 64, 64), (1, 3, 64, 48)]              # 70 rows cropped to 64
    pixels = preprocess(images)
    ehs, pooled = StandInEncoder().encode_prompts(prompts)
    first = scorer.score_latents(encoder.encode_pixels(np.stack([pixels[0], pixels[2]])), ehs[[0, 2]], pooled[[0, 2]])
    second = scorer.score_latents(encoder.encode_pixels(pixels[1][None]), ehs[[1]], pooled[[1]])
    np.testing.assert_array_equal(scores, [first[0], second[0], first[1]])
    embedded = scorer(images, prompt_embeds=ehs, pooled_prompt_embeds=pooled)      # precomputed embeddings
    np.testing.assert_array_equal(embedded, scores)


def test_an_image_object_given_twice_is_encoded_once(model):
    """A batch's fillers (copies of its first image, as score runs pass them) are not encoded again:
    their latents are the first one's, and the scores those of encoding every image."""
    encoder = StandInEncoder()
    scorer = DiffusionRMSD3Scorer(model=model, u=0.4, seed=3, noise="fixed", encoder=encoder)
    rng = np.random.default_rng(5)
    first, other = (rng.random((64, 64, 3), dtype=np.float32) for _ in range(2))
    prompts = ["a", "b", "a", "a"]
    scores = scorer([first, other, first, first], prompts, sample_ids=[0, 1, 0, 0])
    assert encoder.pixel_batches == [(2, 3, 64, 64)]
    every = scorer([first, other, first.copy(), first.copy()], prompts, sample_ids=[0, 1, 0, 0])
    assert encoder.pixel_batches[1:] == [(4, 3, 64, 64)]
    np.testing.assert_array_equal(scores, every)
    assert scores[0] != scores[1]


def test_image_call_errors(model):
    scorer = DiffusionRMSD3Scorer(model=model, u=0.4, encoder=StandInEncoder())
    image = np.zeros((32, 32, 3), np.float32)
    with pytest.raises(InputError, match="got 2 images and 1 prompts"):
        scorer([image, image], ["one"])
    with pytest.raises(InputError, match="prompts are required"):
        scorer([image])
    with pytest.raises(ConfigError, match="size_policy must be one of"):
        DiffusionRMSD3Scorer(model=model, size_policy="squash")


def test_mindone_adapter_scales_the_posterior_mode_and_asks_for_no_guidance():
    calls = {}

    class Dist:
        def mode(self, moments):
            return moments[:, :16]

        def sample(self, moments, generator):
            calls["generator"] = generator
            return moments[:, :16] + 1

    class Vae:
        dtype = ms.float32
        config = SimpleNamespace(shift_factor=0.0609, scaling_factor=1.5305)
        diag_gauss_dist = Dist()

        def encode(self, x):
            return (ms.Tensor(np.ones((x.shape[0], 32, x.shape[2] // 8, x.shape[3] // 8), np.float32)),)

    def encode_prompt(*args, **kwargs):
        calls["prompt"] = (args, kwargs)
        return "embeds", None, "pooled", None

    pipeline = SimpleNamespace(vae=Vae(), encode_prompt=encode_prompt)
    latents = MindOneSD3Encoder(pipeline).encode_pixels(np.zeros((2, 3, 32, 16), np.float32))
    assert latents.shape == (2, 16, 4, 2)
    np.testing.assert_allclose(latents.asnumpy(), (1 - 0.0609) * 1.5305, rtol=1e-6)
    sampled = MindOneSD3Encoder(pipeline, sample=True, seed=4).encode_pixels(np.zeros((1, 3, 16, 16), np.float32))
    np.testing.assert_allclose(sampled.asnumpy(), (2 - 0.0609) * 1.5305, rtol=1e-6)
    assert isinstance(calls["generator"], np.random.Generator)
    assert MindOneSD3Encoder(pipeline, max_sequence_length=77).encode_prompts(["a", "b"]) == ("embeds", "pooled")
    args, kwargs = calls["prompt"]
    assert args == (["a", "b"], ["a", "b"], ["a", "b"])
    assert kwargs == {"do_classifier_free_guidance": False, "max_sequence_length": 77}
    with pytest.raises(ConfigError, match="needs a mindone StableDiffusion3Pipeline"):
        MindOneSD3Encoder(SimpleNamespace(vae=None))


# --- pairs files of ms-rm score-images ------------------------------------------------------
def test_pairs_from_csv_and_jsonl_resolve_images_beside_the_file(tmp_path):
    from ms_rm.scoring.runs import read_pairs

    (tmp_path / "pairs.csv").write_text('image,prompt\na.png,"a cat, sitting"\nsub/b.png,a dog\n')
    (tmp_path / "pairs.jsonl").write_text('{"image": "a.png", "prompt": "a cat, sitting"}\n\n'
                                          '{"image": "sub/b.png", "prompt": "a dog"}\n')
    expected = [(str(tmp_path / "a.png"), "a cat, sitting"), (str(tmp_path / "sub" / "b.png"), "a dog")]
    assert read_pairs(str(tmp_path / "pairs.csv")) == expected
    assert read_pairs(str(tmp_path / "pairs.jsonl")) == expected


@pytest.mark.parametrize("name, text, message", [
    ("p.jsonl", '{"image": "a.png"}\n', "entry 1: needs an 'image' path and a 'prompt' string"),
    ("p.jsonl", '{"image": "a.png", "prompt": "x"}\n{oops\n', "line 2: not valid JSON"),
    ("p.csv", "file,text\na.png,x\n", "entry 1: needs an 'image' path"),
    ("p.csv", "image,prompt\n", "holds no pairs"),
    ("p.txt", "a.png x\n", "must be a .csv"),
])
def test_bad_pairs_files_say_where(tmp_path, name, text, message):
    from ms_rm.scoring.runs import read_pairs

    (tmp_path / name).write_text(text)
    with pytest.raises(InputError, match=message):
        read_pairs(str(tmp_path / name))
