"""Evaluation on preference data (ms_rm.evaluation, `ms-rm eval`): the metrics against the upstream
evaluation code (HPSv2's functions from its wheel, ImageReward's rule), readers and their errors,
the score cache, Diffusion-RM's accuracy against score calls made by hand, and msrun sharding."""

import json
import math
import os

import numpy as np
import pytest

from helpers import converted_checkpoint, ms_rm_command, msrun

from ms_rm import InputError
from ms_rm.evaluation import metrics, read_pairs, read_rankings
from ms_rm.evaluation.cache import ScoreCache
from ms_rm.evaluation.data import Sample
from ms_rm.evaluation import run as run_module
from ms_rm.evaluation.run import EvalReward, evaluate_pairs, evaluate_rankings
from ms_rm_parity import upstream_eval
from ms_rm_parity.compare import FP32_BOUND, max_rel_error


def _random_rankings(seed, count=300, ties_in_scores=True):
    """Rankings of 2-9 generations (ImageReward's test set has 4-9), ranks with gaps and human ties,
    scores with ties when asked."""
    rng = np.random.default_rng(seed)
    ranks, scores = [], []
    for _ in range(count):
        n = int(rng.integers(2, 10))
        r = rng.choice([1, 2, 3, 5, 6, 9], size=n).tolist()        # gaps, and ties in most items
        if len(set(r)) == 1:
            r[0] += 1                                                # HPSv2's calc_ImageReward divides by zero otherwise
        s = (rng.integers(0, 4, n) if ties_in_scores else rng.standard_normal(n)).astype(float).tolist()
        ranks.append(r)
        scores.append(s)
    return ranks, scores


# --- the metrics against the upstream code -----------------------------------------------------------

def test_ranking_metrics_equal_the_upstream_functions():
    hpsv2 = upstream_eval.hpsv2_functions()
    ranks, scores = _random_rankings(0)
    assert metrics.imagereward_acc(ranks, scores) == upstream_eval.imagereward_acc(ranks, scores)
    # HPSv2's evaluate_IR / evaluate_rank: score += the per-prompt values, then / len(dataset); its sum's
    # last digits follow its loader's batches, ms_rm's mean is correctly rounded: equal to 1e-14
    expected_ir = sum(hpsv2["calc_ImageReward"](s, r) for r, s in zip(ranks, scores)) / len(ranks)
    assert metrics.hpsv2_imagereward_acc(ranks, scores).value == pytest.approx(expected_ir, rel=1e-14, abs=0)
    expected_inv = sum(hpsv2["inversion_score"](upstream_eval.hpsv2_ranking(s), r)
                       for r, s in zip(ranks, scores)) / len(ranks)
    assert metrics.hpsv2_inversion_score(ranks, scores).value == pytest.approx(expected_inv, rel=1e-14, abs=0)
    # the three differ on this data (ties): each is its own metric
    values = {metrics.imagereward_acc(ranks, scores), expected_ir, expected_inv}
    assert len(values) == 3


def test_ties_are_treated_as_upstream():
    hpsv2 = upstream_eval.hpsv2_functions()
    # a model tie is wrong for ImageReward's rule; a human tie is skipped there, kept by the inversion score
    assert metrics.imagereward_acc([[1, 2]], [[0.5, 0.5]]) == 0.0
    assert metrics.imagereward_acc([[1, 1, 2]], [[3.0, 1.0, 2.0]]) == 0.5
    assert metrics.hpsv2_inversion_score([[1, 1, 2]], [[3.0, 1.0, 2.0]]).value == pytest.approx(1 - 1 / 3)
    # a ranking the humans tied entirely: HPSv2's code divides by zero; ms_rm leaves it out and says so
    with pytest.raises(ZeroDivisionError):
        hpsv2["calc_ImageReward"]([1.0, 2.0], [3, 3])
    result = metrics.hpsv2_imagereward_acc([[3, 3], [1, 2]], [[1.0, 2.0], [2.0, 1.0]])
    assert (result.value, result.prompts, result.left_out) == (1.0, 1, 1)
    # equal model scores are ranked by position, as torch.argsort is for <= 16 generations
    for scores in ([2.0, 2.0, 1.0, 2.0], [0.0] * 9, [1.0, 3.0, 1.0, 3.0, 1.0]):
        assert metrics.model_ranks(scores).tolist() == upstream_eval.hpsv2_ranking(scores)


def test_pairwise_accuracy_and_interval_equal_a_direct_computation():
    rng = np.random.default_rng(1)
    chosen, rejected = rng.standard_normal(500), rng.standard_normal(500) - 0.5
    rejected[:20] = chosen[:20]                                  # model ties: wrong, as the reference's (c - r) > 0
    correct = chosen - rejected > 0
    assert metrics.pairwise_accuracy(chosen, rejected) == correct.mean()
    interval = metrics.bootstrap_interval(correct, resamples=2000, seed=7)
    draws = np.random.default_rng(7).integers(0, 500, size=(2000, 500))
    low, high = np.quantile(correct[draws].mean(axis=1), [0.025, 0.975])
    assert (interval.low, interval.high) == (low, high)
    half = 1.96 * math.sqrt(correct.mean() * (1 - correct.mean()) / 500)    # the normal approximation
    assert interval.low < correct.mean() < interval.high
    assert abs((interval.high - interval.low) / (2 * half) - 1) < 0.15


def test_agreement_and_kendall_tau():
    from scipy.stats import kendalltau

    rng = np.random.default_rng(2)
    a, b = rng.standard_normal(300), rng.standard_normal(300)
    assert metrics.agreement(a, b) == np.mean(np.sign(a) == np.sign(b))
    for _ in range(20):
        x, y = rng.integers(0, 4, 7).astype(float), rng.integers(0, 4, 7).astype(float)   # ties: tau-b
        assert metrics.kendall_tau(x, y) == pytest.approx(kendalltau(x, y).statistic, abs=1e-15)
    assert math.isnan(metrics.kendall_tau([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


# --- readers -------------------------------------------------------------------------------------------

def _images(folder, names):
    os.makedirs(folder, exist_ok=True)
    for name in names:
        with open(os.path.join(folder, name), "wb") as f:
            f.write(b"same bytes")                               # identical content: still two images
    return folder


def _write(path, items, lines=True):
    with open(path, "w") as f:
        if lines:
            f.write("".join(json.dumps(item) + "\n" for item in items))
        else:
            json.dump(items, f)
    return str(path)


def test_readers_read_both_ranking_layouts_with_ties_and_gaps(tmp_path):
    _images(tmp_path / "img", ["a.png", "b.png", "c.png"])
    ir = _write(tmp_path / "ir.json", [{"id": "x", "prompt": "p", "generations": ["img/a.png", "img/b.png", "img/c.png"],
                                        "ranking": [1, 5, 5]}], lines=False)
    hpd = _write(tmp_path / "hpd.json", [{"prompt": "p", "image_path": ["img/a.png", "img/b.png"], "rank": [2, 1]}],
                 lines=False)
    (first,) = read_rankings(ir)
    assert first.ranks == (1.0, 5.0, 5.0) and first.id == "x" and len(first.samples) == 3
    assert first.samples[0].path == str(tmp_path / "img" / "a.png")
    (second,) = read_rankings(hpd)
    assert second.ranks == (2.0, 1.0)
    pairs = read_pairs(_write(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "img/a.png", "rejected": "img/b.png"}]))
    assert pairs[0].chosen.path == str(tmp_path / "img" / "a.png")


@pytest.mark.parametrize("items, message", [
    ([{"prompt": "p", "chosen": "img/a.png", "rejected": "img/missing.png"}], r"p.jsonl:1: img/missing.png not found"),
    ([{"prompt": "p", "chosen": "img/a.png", "rejected": "img/a.png"}], r"p.jsonl:1: chosen and rejected are the same"),
    ([{"chosen": "img/a.png", "rejected": "img/b.png"}], r"p.jsonl:1: a pair needs .*missing or empty: \['prompt'\]"),
])
def test_bad_pairs_get_one_line_errors_naming_the_line(tmp_path, items, message):
    _images(tmp_path / "img", ["a.png", "b.png"])
    with pytest.raises(InputError, match=message):
        read_pairs(_write(tmp_path / "p.jsonl", items))


def test_bad_rankings_and_files_get_one_line_errors(tmp_path):
    _images(tmp_path / "img", ["a.png", "b.png"])
    bad = _write(tmp_path / "r.json", [{"prompt": "p", "generations": ["img/a.png", "img/b.png"], "ranking": [1]}],
                 lines=False)
    with pytest.raises(InputError, match=r"r.json item 0: 1 ranks for 2 generations"):
        read_rankings(bad)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(InputError, match="empty.jsonl: the file is empty"):
        read_pairs(str(tmp_path / "empty.jsonl"))
    (tmp_path / "broken.jsonl").write_text('{"prompt": "p"}\n{nope\n')
    with pytest.raises(InputError, match=r"broken.jsonl:2: not a JSON object"):
        read_pairs(str(tmp_path / "broken.jsonl"))


# --- the cache -----------------------------------------------------------------------------------------

def _counting_reward(label="fake", noisy=False, us=()):
    """A reward whose score is a function of the sample's file name (and u), counting what it scores."""
    calls = []

    def score(samples, prompts, noise_ids, u):
        calls.extend(s.path for s in samples)
        return np.array([float(os.path.basename(s.path).split(".")[0]) + (u or 0) for s in samples])

    return EvalReward(label, score, {"kind": "fake"}, noisy=noisy, us=us, u=us[0] if us else None), calls


def _fake_pairs(count):
    from ms_rm.evaluation.data import Pair

    return [Pair("p", Sample(f"/x/{2 * i + (i % 3 == 0)}.png"), Sample(f"/x/{2 * i + (i % 3 != 0)}.png"), f"f:{i}")
            for i in range(count)]


def test_an_interrupted_or_extended_run_scores_nothing_twice(tmp_path):
    reward, calls = _counting_reward()
    report = evaluate_pairs(_fake_pairs(6), [reward], str(tmp_path))
    assert len(calls) == 12
    assert report["rewards"]["fake"]["results"][0]["accuracy"] == pytest.approx(2 / 6)
    cache = tmp_path / "scores" / "fake.jsonl"
    with open(cache, "ab") as f:
        f.write(b'{"key": "/x/99.png\\tp", "sco')             # a run killed mid-line
    calls.clear()
    report = evaluate_pairs(_fake_pairs(9), [reward], str(tmp_path))       # extended by three pairs
    assert len(calls) == 6                                   # only the new pairs' samples
    assert report["pairs"] == 9
    assert all(json.loads(line) for line in cache.read_text().splitlines())   # the partial line is gone
    other = EvalReward("fake", reward.score, {"kind": "another"})
    with pytest.raises(InputError, match="scores of another reward"):
        evaluate_pairs(_fake_pairs(2), [other], str(tmp_path))


def test_a_run_killed_while_scoring_keeps_every_chunk_it_finished(tmp_path, monkeypatch):
    from ms_rm.evaluation import run

    monkeypatch.setattr(run, "CHUNK", 4)
    reward, calls = _counting_reward()
    inner = reward.score

    def dies_on_the_third_chunk(samples, *rest):
        if len(calls) >= 8:
            raise KeyboardInterrupt
        return inner(samples, *rest)

    reward.score = dies_on_the_third_chunk
    with pytest.raises(KeyboardInterrupt):
        evaluate_pairs(_fake_pairs(6), [reward], str(tmp_path))
    cached = (tmp_path / "scores" / "fake.jsonl").read_text().split("\n")[1:-1]
    assert len(cached) == 8                                  # two chunks of 4 written before the third died
    reward.score = inner
    calls.clear()
    evaluate_pairs(_fake_pairs(6), [reward], str(tmp_path))
    assert len(calls) == 4                                   # only what the killed run had not finished


def test_no_rank_leaves_scoring_before_the_main_rank_has_written_the_cache(tmp_path):
    """Under msrun a rank that went on while the main rank was still writing read a shorter cache in
    its next call (the trainer's validation reads it twice): the workers' work lists differed."""
    from ms_rm.core.distributed import World

    snapshots = []

    class MainOfTwo(World):               # the main rank of two, whose peer always has the same rows
        def gather_rows(self, array, count):
            return np.concatenate([np.asarray(array, np.float32)] * (self.size if len(array) == 1 else 1))

        def barrier(self):
            snapshots.append(len((tmp_path / "scores" / "fake.jsonl").read_text().splitlines()))

    reward, _ = _counting_reward(noisy=True, us=(0.3, 0.5))
    pairs = _fake_pairs(3)
    samples = [s for p in pairs for s in (p.chosen, p.rejected)]
    run_module.score_all(reward, samples, ["p"] * 6, list(range(6)), str(tmp_path), MainOfTwo(rank=0, size=2))
    assert snapshots and snapshots[-1] == 1 + 2 * 6           # header + every sample at both u


def test_a_prompt_with_unicode_line_breaks_round_trips_through_the_data_and_the_cache(tmp_path):
    prompt = "a lighthouse\u2028at dusk\u0085, \u2029calm"
    _images(tmp_path / "img", ["a.png", "b.png"])
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": prompt, "chosen": "img/a.png", "rejected": "img/b.png"},
                               ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_pairs(str(path))[0].prompt == prompt
    cache = ScoreCache(str(tmp_path / "c.jsonl"), {"kind": "x"})
    cache.add([(f"/img/a.png\t{prompt}", 0.5)])
    assert ScoreCache(str(tmp_path / "c.jsonl"), {"kind": "x"})[f"/img/a.png\t{prompt}"] == 0.5


def test_rankings_report_each_metric_and_the_combination(tmp_path):
    from ms_rm.evaluation.data import Ranking

    rankings = [Ranking("p", tuple(Sample(f"/x/{v}.png") for v in values), ranks, f"f:{k}")
                for k, (values, ranks) in enumerate([((3, 2, 1), (1, 2, 3)), ((1, 2, 4), (1, 1, 2))])]
    first, _ = _counting_reward("a")
    second = EvalReward("b", lambda samples, *rest: -first.score(samples, *rest), {"kind": "fake-b"})
    report = evaluate_rankings(rankings, [first, second], str(tmp_path), weights={"a": 1.0, "b": 0.5})
    a, b = report["rewards"]["a"]["results"][0], report["rewards"]["b"]["results"][0]
    assert a["imagereward_acc"] == 3 / 5 and b["imagereward_acc"] == 2 / 5
    assert report["agreement"][0]["fraction"] == 0.0 and report["agreement"][0]["kendall_tau"] == -1.0
    assert report["combination"]["imagereward_acc"] == a["imagereward_acc"]   # 1.0 a - 0.5 a orders as a


# --- Diffusion-RM through `ms-rm eval` ------------------------------------------------------------------

@pytest.fixture(scope="module")
def latent_pairs(tmp_path_factory):
    """A tiny converted Diffusion-RM, 5 pairs of .npy latents over 3 prompts, and their embeddings."""
    from ms_rm import DiffusionRM

    root = tmp_path_factory.mktemp("eval")
    _, converted = converted_checkpoint(root / "rm")
    backbone = DiffusionRM.from_pretrained(converted).config.backbone
    rng = np.random.default_rng(0)
    prompts = ["a cat", "a dog", "a bird"]
    np.savez(root / "embeddings.npz", prompts=np.array(prompts),
             encoder_hidden_states=rng.standard_normal((3, 6, backbone.joint_attention_dim), dtype=np.float32),
             pooled_projections=rng.standard_normal((3, backbone.pooled_projection_dim), dtype=np.float32))
    items = []
    for i in range(5):
        names = [f"{i}_{side}.npy" for side in ("c", "r")]
        for name in names:
            np.save(root / name, rng.standard_normal((backbone.in_channels, 8, 8), dtype=np.float32))
        items.append({"prompt": prompts[i % 3], "chosen": names[0], "rejected": names[1]})
    return root, converted, _write(root / "pairs.jsonl", items)


def _eval_args(root, converted, data, out, *extra):
    return ["eval", data, "--out", str(out), "--reward", "diffusion-rm", converted,
            f"prompt_embeddings={root / 'embeddings.npz'}", "--u-grid", "0.2,0.6", "--draws", "2", "--seed", "5",
            "--no-progress", *extra]


def test_diffusion_rm_accuracy_at_each_u_equals_score_calls_by_hand(latent_pairs, capsys):
    from ms_rm import DiffusionRM
    from ms_rm.cli import main
    from ms_rm.scoring import DiffusionRMScorer

    root, converted, data = latent_pairs
    assert main(_eval_args(root, converted, data, root / "out")) == 0
    report = json.loads((root / "out" / "report.json").read_text())
    assert "| diffusion-rm | 0.2 |" in capsys.readouterr().out
    assert (root / "out" / "accuracy_vs_u.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    scorer = DiffusionRMScorer(model=DiffusionRM.from_pretrained(converted), seed=5, num_noise_draws=2)
    table = np.load(root / "embeddings.npz")
    pairs = [json.loads(line) for line in open(data)]
    rows = [["a cat", "a dog", "a bird"].index(p["prompt"]) for p in pairs]
    ehs, pooled = table["encoder_hidden_states"][rows], table["pooled_projections"][rows]
    cached = {json.loads(line)["key"]: json.loads(line)["score"]
              for line in (root / "out" / "scores" / "diffusion-rm.jsonl").read_text().split("\n")[1:-1]}
    for result in report["rewards"]["diffusion-rm"]["results"]:
        scores = {side: scorer.score_latents(np.stack([np.load(root / p[side]) for p in pairs]), ehs, pooled,
                                             u=result["u"], sample_ids=list(range(len(pairs))))   # a pair's noise: its index
                  for side in ("chosen", "rejected")}
        by_hand = np.mean(np.array(scores["chosen"]) > np.array(scores["rejected"]))
        assert result["accuracy"] == by_hand
        for side in ("chosen", "rejected"):                  # and every sample's score, with its pair's noise
            ours = [cached[f"{root / p[side]}\t{p['prompt']}\tu={result['u']!r}\tnoise={i}"] for i, p in enumerate(pairs)]
            # the same samples in other batches: float32 GEMM blocking, within the tolerance policy
            assert max_rel_error(np.array(ours), np.array(scores[side])) <= FP32_BOUND
    assert {r["u"] for r in report["rewards"]["diffusion-rm"]["results"]} == {0.2, 0.6, 0.4}   # 0.4: the headline u


@pytest.mark.slow
def test_sharded_eval_equals_one_process(latent_pairs):
    root, converted, data = latent_pairs
    from ms_rm.cli import main

    assert main(_eval_args(root, converted, data, root / "one")) == 0
    code, logs = msrun(ms_rm_command(), *_eval_args(root, converted, data, root / "two"), log_dir=root / "logs")
    assert code == 0, logs[-3000:]
    one, two = (json.loads((root / name / "report.json").read_text()) for name in ("one", "two"))
    assert one["rewards"] == two["rewards"]
    cached = [{json.loads(line).get("key"): json.loads(line).get("score")
               for line in (root / name / "scores" / "diffusion-rm.jsonl").read_text().splitlines()[1:]}
              for name in ("one", "two")]
    assert cached[0].keys() == cached[1].keys()
    for key, value in cached[0].items():
        assert cached[1][key] == pytest.approx(value, rel=1e-5, abs=1e-6)      # GEMM blocking follows the batch


def test_reference_parquet_pairs_read_as_the_reference_bucket_dataset_does(tmp_path):
    """The reference's preprocessed layout: prompt, latent1 (chosen), latent2 (rejected) as .npy bytes."""
    import io

    from helpers import import_extra

    pa = import_extra("pyarrow", "pyarrow", "eval")
    import pyarrow.parquet as pq
    from ms_rm.evaluation import read_latent
    from ms_rm.evaluation.data import ParquetLatents

    rng = np.random.default_rng(3)
    latents = rng.standard_normal((3, 2, 16, 4, 4), dtype=np.float32)

    def npy(array):
        buffer = io.BytesIO()
        np.save(buffer, array)
        return buffer.getvalue()

    table = pa.table({"prompt": ["a", "b", "c"], "latent1": [npy(x) for x in latents[:, 0]],
                      "latent2": [npy(x) for x in latents[:, 1]]})
    pq.write_table(table, tmp_path / "val.parquet", row_group_size=2)          # rows 0-1, then row 2
    pairs = read_pairs(str(tmp_path / "val.parquet"))
    assert [p.prompt for p in pairs] == ["a", "b", "c"]
    reader = ParquetLatents()
    for k, pair in enumerate(pairs):
        np.testing.assert_array_equal(read_latent(pair.chosen, reader), latents[k, 0])
        np.testing.assert_array_equal(read_latent(pair.rejected, reader), latents[k, 1])
    np.testing.assert_array_equal(read_latent(pairs[0].rejected), latents[0, 1])      # without a reader
    pq.write_table(pa.table({"prompt": ["a"]}), tmp_path / "other.parquet")
    with pytest.raises(InputError, match="other.parquet: not the reference's preference parquet"):
        read_pairs(str(tmp_path / "other.parquet"))


def test_pickscore_on_rankings_equals_its_scores_by_hand(tmp_path, capsys):
    """A pixels reward through `ms-rm eval` on HPDv2-layout rankings: the metrics of CLIPScorer's own scores."""
    from helpers import import_extra

    PIL_Image = import_extra("PIL.Image", "pillow", "images")
    from ms_rm.cli import main
    from ms_rm.scoring.clip import CLIPScorer
    from ms_rm_parity.clip_parity import write_tiny_clip

    folder = str(tmp_path / "clip")
    write_tiny_clip(folder, "laion", seed=3)
    rng = np.random.default_rng(4)
    items = []
    for k, prompt in enumerate(["a cat", "a red cube", "two apples"]):
        names = []
        for j in range(3):
            names.append(f"{k}_{j}.png")
            PIL_Image.fromarray(rng.integers(0, 256, (24 + 8 * j, 32, 3), dtype=np.uint8)).save(tmp_path / names[-1])
        items.append({"prompt": prompt, "image_path": names, "rank": [1, 2, 2] if k else [3, 1, 2]})
    data = _write(tmp_path / "test.json", items, lines=False)
    assert main(["eval", data, "--out", str(tmp_path / "out"), "--reward", "clip", folder, "--no-progress",
                 "--no-plot"]) == 0
    result = json.loads((tmp_path / "out" / "report.json").read_text())["rewards"]["clip"]["results"][0]
    scorer = CLIPScorer(folder)
    scores = [scorer([PIL_Image.open(tmp_path / n) for n in item["image_path"]], [item["prompt"]] * 3)
              for item in items]
    ranks = [item["rank"] for item in items]
    assert result["imagereward_acc"] == upstream_eval.imagereward_acc(ranks, scores)
    hpsv2 = upstream_eval.hpsv2_functions()
    assert result["hpsv2_inversion_score"] == pytest.approx(
        sum(hpsv2["inversion_score"](upstream_eval.hpsv2_ranking(s), r) for r, s in zip(ranks, scores)) / 3,
        rel=1e-14, abs=0)
