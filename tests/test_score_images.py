"""From PNG files and prompts to scores, end to end on the CPU, against torch.

Tiny random models built here: an SD3-style VAE (diffusers), SD3's three text encoders and
tokenizers (transformers), and a Diffusion-RM (diffusers + peft + the torch head), saved in
their real formats. ms_rm scores the PNGs with `ms-rm score-images`; the torch side encodes the
same files with diffusers' AutoencoderKL and StableDiffusion3Pipeline.encode_prompt and runs the
reference reward model on the same noise.
"""

import json

import numpy as np
import pytest
import torch
import mindspore as ms
from PIL import Image

from ms_rm.core.errors import InputError
from ms_rm_parity.cases import CASES
from ms_rm_parity.compare import FP32_BOUND, max_rel_error
from ms_rm_parity.reference import as_torch, load_reference_model, lookup_u
from ms_rm_parity.text_reference import reference_encode_prompt, write_sd3_text_folder
from ms_rm_parity.vae_reference import build_reference_vae, tiny_vae_config

from helpers import converted_checkpoint, ms_rm_command, msrun

T5_TOKENS = 12
U = 0.1
# Two parity-checked parts chained (the encoders, then the reward model), each within the tolerance
# policy's floor: the end-to-end score within twice that.
PIPELINE_BOUND = 2 * FP32_BOUND
SEED = 5


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("score_images")
    case = CASES["tiny-sd35"]                                           # joint_attention_dim 48, pooled 40
    paths, model = converted_checkpoint(root, case)
    reference, _, _ = load_reference_model(paths.src, paths.transformer, paths.scheduler)
    pipeline = root / "pipeline"
    text = write_sd3_text_folder(str(pipeline), seed=3, t5_width=48, clip_widths=(16, 24))
    vae = build_reference_vae(tiny_vae_config(latent_channels=16), seed=4)
    vae.save_pretrained(str(pipeline / "vae"), safe_serialization=True)
    rng = np.random.default_rng(0)
    images = {"a.png": (64, 64), "b.png": (48, 80), "c.png": (64, 64)}
    for name, (h, w) in images.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name)
    prompts = {"a.png": "a red cube on a table", "b.png": "a photo of a dog", "c.png": "the blue sky"}
    return dict(root=root, reference=reference, model=model, pipeline=pipeline, text=text, vae=vae,
                prompts=prompts, case=case)


def torch_scores(world, names):
    """The reference pipeline on the same files: ToTensor + Normalize(0.5, 0.5), VAE mode,
    (z - shift) * scale, encode_prompt, noise as a seeded scorer draws it for a pairs run (each
    pair's from default_rng([SEED, its index])), nearest-sigma u, the torch reward model."""
    vae, case = world["vae"], world["case"]
    ehs, pooled = reference_encode_prompt(world["text"], [world["prompts"][n] for n in names], T5_TOKENS, 48)
    pixels = [np.asarray(Image.open(world["root"] / n).convert("RGB"), np.float32).transpose(2, 0, 1) / 127.5 - 1
              for n in names]
    groups = {}
    for i, p in enumerate(pixels):
        groups.setdefault(p.shape, []).append(i)
    scores = [None] * len(names)
    for indices in groups.values():
        with torch.no_grad():
            z = vae.encode(as_torch(np.stack([pixels[i] for i in indices]))).latent_dist.mode()
        latents = (z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
        noise = np.stack([np.random.default_rng([SEED, i]).standard_normal((1, 1) + tuple(latents.shape[1:]),
                                                                           dtype=np.float32)[0, 0] for i in indices])
        sigma, timestep = lookup_u(case.scheduler, [U] * len(indices), "sigma")
        with torch.no_grad():
            stages = world["reference"].stages(latents, as_torch(noise), sigma, timestep,
                                                     as_torch(ehs[indices]), as_torch(pooled[indices]))
        for i, value in zip(indices, stages["reward"][:, 0]):
            scores[i] = float(value)
    return np.array(scores)


def test_score_images_command_matches_torch_from_png_to_score(world, capsys):
    from ms_rm.cli import main

    root, names = world["root"], ["a.png", "b.png", "c.png"]
    args = ["score-images", world["model"], "--vae", str(world["pipeline"] / "vae"),
            "--text-encoders", str(world["pipeline"]), "--seed", str(SEED), "--u", str(U),
            "--max-sequence-length", str(T5_TOKENS), "--out", str(root / "scores.jsonl"), "--no-progress"]
    for name in names:
        args += ["--image", str(root / name), "--prompt", world["prompts"][name]]
    assert main(args) == 0
    rows = [json.loads(line) for line in (root / "scores.jsonl").read_text().splitlines()]
    assert [r["image"] for r in rows] == [str(root / n) for n in names]
    assert [r["prompt"] for r in rows] == [world["prompts"][n] for n in names]
    ours = np.array([r["score"] for r in rows])
    expected = torch_scores(world, names)
    assert max_rel_error(ours, expected) <= PIPELINE_BOUND, (ours, expected)
    printed = capsys.readouterr().out.strip().splitlines()
    assert [float(line.split("\t")[0]) for line in printed] == pytest.approx(ours, abs=1e-6)


@pytest.mark.slow
def test_score_images_across_two_workers_equals_one_process(world):
    """Under msrun each worker scores its shard (2 + 1 pairs); the main rank writes the whole file,
    equal to one process's (each pair's noise from (seed, its index))."""
    root, names = world["root"], ["a.png", "b.png", "c.png"]
    args = ["score-images", world["model"], "--vae", str(world["pipeline"] / "vae"), "--text-encoders",
            str(world["pipeline"]), "--seed", str(SEED), "--u", str(U), "--max-sequence-length", str(T5_TOKENS),
            "--no-progress", "--batch-size", "1"]
    for name in names:
        args += ["--image", str(root / name), "--prompt", world["prompts"][name]]
    code, logs = msrun(ms_rm_command(), *args, "--out", root / "two.jsonl", log_dir=root / "logs-two")
    assert code == 0, logs[-3000:]
    rows = [json.loads(line) for line in (root / "two.jsonl").read_text().splitlines()]
    assert [r["image"] for r in rows] == [str(root / n) for n in names]
    expected = torch_scores(world, names)
    assert max_rel_error(np.array([r["score"] for r in rows]), expected) <= PIPELINE_BOUND


def test_pairs_file_and_python_call_agree(world):
    from ms_rm import DiffusionRM, DiffusionRMSD3Scorer
    from ms_rm.encoders import SD3Encoder
    from ms_rm.scoring.runs import read_pairs, score_pairs

    root = world["root"]
    (root / "pairs.csv").write_text("image,prompt\n" + "".join(f"{n},{world['prompts'][n]}\n" for n in ("b.png", "a.png")))
    encoder = SD3Encoder.from_pretrained(str(world["pipeline"] / "vae"), str(world["pipeline"]),
                                         max_sequence_length=T5_TOKENS, joint_attention_dim=48)
    scorer = DiffusionRMSD3Scorer(model=DiffusionRM.from_pretrained(world["model"]), u=U, seed=SEED, encoder=encoder)
    rows = list(score_pairs(scorer, read_pairs(str(root / "pairs.csv")), batch_size=8, progress=False))
    expected = torch_scores(world, ["b.png", "a.png"])
    ours = np.array([r["score"] for r in rows])
    assert max_rel_error(ours, expected) <= PIPELINE_BOUND, (ours, expected)


def test_score_images_errors_name_the_problem(world):
    from ms_rm.cli import main

    base = ["score-images", world["model"], "--vae", str(world["pipeline"] / "vae")]
    assert main(base + ["--image", "x.png"]) == 2                       # one image, no prompt
    with pytest.raises(InputError, match="pass one --prompt per --image"):
        main(["--debug"] + base + ["--image", "x.png"])
    with pytest.raises(InputError, match="x.png: image file not found"):
        main(["--debug"] + base + ["--image", str(world["root"] / "x.png"), "--prompt", "p", "--no-progress"])


def _flat_image_pairs(folder, sizes):
    """(path, prompt) pairs of flat PNGs of the given (width, height), image i of red value i."""
    pairs = []
    for i, size in enumerate(sizes):
        path = folder / f"{i}.png"
        Image.new("RGB", size, (i, 0, 0)).save(path)
        pairs.append((str(path), f"prompt {i}"))
    return pairs


def test_score_runs_call_one_batch_size_per_image_size(tmp_path):
    """Batches hold one image size and are filled up to the batch size (so a model compiles one
    graph per size); the fillers' scores are dropped and every pair keeps its own score and index."""
    from ms_rm.scoring.runs import score_pairs

    pairs = _flat_image_pairs(tmp_path, [(32, 32), (48, 32), (32, 32), (32, 32), (48, 32), (16, 64)])

    class Recorder:
        seed = 0
        calls = []

        def __call__(self, images, prompts, sample_ids):
            self.calls.append(([im.size for im in images], list(sample_ids)))
            return [1000.0 * sample_id + im.getpixel((0, 0))[0] for im, sample_id in zip(images, sample_ids)]

    scorer = Recorder()
    rows = score_pairs(scorer, pairs, batch_size=2, progress=False)
    assert [r["score"] for r in rows] == [1001.0 * i for i in range(6)]
    assert [r["prompt"] for r in rows] == [p for _, p in pairs]
    assert all(len(set(images)) == 1 for images, _ in scorer.calls)
    assert [ids for _, ids in scorer.calls] == [[0, 2], [3, 3], [1, 4], [5]]     # a lone size: not filled


def test_score_runs_batch_by_the_scorers_fitted_size(tmp_path):
    """With a scorer that fits sizes (the "bucket" policy), images of different sizes that fit to one
    size share batches: one compiled graph per bucket, not per size."""
    from ms_rm.scoring.images import fitted_size
    from ms_rm.scoring.runs import score_pairs

    pairs = _flat_image_pairs(tmp_path, [(750, 1000), (760, 1010), (768, 1024), (512, 512)])

    class Bucketing:
        calls = []

        def fitted_size(self, height, width):
            return fitted_size(height, width, "bucket")

        def __call__(self, images, prompts):
            self.calls.append(sorted({im.size for im in images}))
            return [float(im.getpixel((0, 0))[0]) for im in images]

    scorer = Bucketing()
    rows = score_pairs(scorer, pairs, batch_size=4, progress=False)
    assert [r["score"] for r in rows] == [0.0, 1.0, 2.0, 3.0]
    assert scorer.calls == [[(750, 1000), (760, 1010), (768, 1024)], [(512, 512)]]


def test_prompt_table_keeps_each_distinct_prompt_once_and_returns_rows_in_order(tmp_path):
    """score-images encodes the distinct prompts first (batches filled to the batch size) and reads
    their rows back from disk in any order; the scores then equal encoding with the images."""
    from ms_rm.scoring.runs import PromptTable

    calls = []

    def encode(prompts):
        calls.append(list(prompts))
        codes = np.array([[ord(c) for c in (p * 8)[:8]] for p in prompts], np.float32)
        return ms.Tensor(np.repeat(codes[:, None, :], 3, axis=1)), ms.Tensor(codes[:, :5] * 2)

    prompts = ["a cat", "two dogs", "a cat", "a bird", "an owl"]
    table = PromptTable.encode(encode, prompts, str(tmp_path), batch_size=3, progress=False)
    assert calls == [["a cat", "two dogs", "a bird"], ["an owl", "an owl", "an owl"]]
    embeds, pooled = table.rows(["an owl", "a cat", "a cat"])
    reference = encode(["an owl", "a cat", "a cat"])
    np.testing.assert_array_equal(embeds, reference[0].asnumpy())
    np.testing.assert_array_equal(pooled, reference[1].asnumpy())
    assert embeds.shape == (3, 3, 8) and pooled.shape == (3, 5)
    with pytest.raises(InputError, match="not encoded beforehand"):
        table.rows(["a fish"])


def test_eval_of_diffusion_rm_on_image_pairs_matches_torch(world, capsys):
    """`ms-rm eval` of Diffusion-RM on image pairs (SD3 VAE and text encoders in MindSpore): each
    cached score is the torch pipeline's for that image and the pair's prompt, with the pair's
    noise (drawn from (seed, the pair's index), the same for chosen and rejected); the accuracy
    is the fraction the torch scores order right."""
    from ms_rm.cli import main

    root = world["root"]
    pairs = [("a.png", "b.png", world["prompts"]["a.png"]), ("c.png", "a.png", world["prompts"]["c.png"])]
    (root / "prefs.jsonl").write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n"
                                             for c, r, p in pairs))
    assert main(["eval", str(root / "prefs.jsonl"), "--out", str(root / "eval"), "--reward", "diffusion-rm",
                 world["model"], f"vae={world['pipeline'] / 'vae'}", f"text_encoders={world['pipeline']}",
                 f"max_sequence_length={T5_TOKENS}", f"u={U}", "--seed", str(SEED), "--no-progress",
                 "--no-plot"]) == 0
    cached = {}
    for line in (root / "eval" / "scores" / "diffusion-rm.jsonl").read_text().splitlines()[1:]:
        row = json.loads(line)
        path, prompt, u, noise = row["key"].split("\t")
        cached[(path, noise)] = row["score"]
    # the torch pipeline on each side's images, with each pair's prompt and its index as the noise id
    chosen = torch_scores(dict(world, prompts={c: p for c, _, p in pairs}), [c for c, _, _ in pairs])
    rejected = torch_scores(dict(world, prompts={r: p for _, r, p in pairs}), [r for _, r, _ in pairs])
    ours_chosen = np.array([cached[(str(root / c), f"noise={i}")] for i, (c, _, _) in enumerate(pairs)])
    ours_rejected = np.array([cached[(str(root / r), f"noise={i}")] for i, (_, r, _) in enumerate(pairs)])
    assert max_rel_error(ours_chosen, chosen) <= PIPELINE_BOUND, (ours_chosen, chosen)
    assert max_rel_error(ours_rejected, rejected) <= PIPELINE_BOUND, (ours_rejected, rejected)
    report = json.loads((root / "eval" / "report.json").read_text())
    assert report["rewards"]["diffusion-rm"]["results"][0]["accuracy"] == np.mean(chosen > rejected)
