"""The benchmark runs and reports (a smoke test: no timing is asserted)."""

import numpy as np

from ms_rm import RewardModelConfig
from ms_rm_parity.bench import _json, format_report, reward_flops, run, sizes


def test_small_benchmark_runs_and_reports():
    report = run(["small"], runs=1, threads=2, batches=[1, 2], compile_cache=True)
    entry = report["sizes"]["small"]
    for framework in ("torch", "ms"):
        r = entry["runs"][framework]
        assert r["median"] > 0 and r["first_call"] > 0 and r["peak_rss"] > 0
    # Same weights (seeded per name) and inputs in two processes: the rewards must agree.
    np.testing.assert_allclose(entry["runs"]["ms"]["reward"], entry["runs"]["torch"]["reward"], rtol=1e-4, atol=1e-5)
    # the second new process took its graph from the cache the first one filled
    assert entry["compile_cache"]["reused"] == 1
    assert set(entry["batch_scaling"]["ms"]) == {1, 2} and report["cpu"]["cores"] >= 1
    text = format_report(report)
    assert "| small | ms_rm (graph) |" in text and "GFLOP per sample" in text and text.startswith("CPU: ")
    assert "after one earlier run filled it" in text and "time per sample at batch 2" in text


def test_flop_count_of_one_block_by_hand():
    """The analytic count against a hand count of a 1-block SD3 (no dual attention) reward model."""
    spec = sizes()["small"]
    rm = {"model": dict(spec["rm"]["model"], num_transformer_layers=1, visual_head_idx=[1], text_head_idx=[1],
                        reward_head=dict(spec["rm"]["model"]["reward_head"], num_queries=2))}
    transformer = dict(spec["transformer"], num_layers=2, dual_attention_layers=[])
    config = RewardModelConfig.from_reference(rm, transformer, _json("scheduler_config.json"))
    d, n, t, j, p = 512, 16, 5, 4096, 2048                     # 8x8 latents -> 16 tokens, 5 text tokens
    backbone = (2 * n * 64 * d + 2 * t * j * d + 2 * (256 * d + d * d) + 2 * (p * d + d * d)
                + 2 * d * 12 * d                                              # adaLN of both streams
                + 2 * (n + t) * 3 * d * d + 2 * (n + t) * d * d               # q, k, v and the two outs
                + 4 * (n + t) ** 2 * d + 2 * (n + t) * 8 * d * d)             # attention, both FFNs
    w, f, q = d, d // 4, 2
    head = (2 * (d * 2 * w + 4 * w * w) * 2 + 2 * (n + t) * w * f + 2 * (n + t) * f * w   # adapters, agg
            + 2 * (n + t) * w * w * 3 + 2 * (n + t) * w + 4 * q * (n + t) * w         # k, v, gates; attend
            + 4 * q * w * w + 4 * n * w * w + 4 * q * n * w + 4 * q * w * w          # attn1 q/out, attn2
            + 16 * q * w * w + 2 * q * w)                                            # ffn, head
    assert reward_flops(config, 8, 8, t) == backbone + head
