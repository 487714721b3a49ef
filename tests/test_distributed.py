"""Runs across workers with MindSpore's msrun: 2 CPU workers (mccl) on loopback against one process.

Each test launches `msrun --worker_num=2` on a free port and compares what the job wrote with what
one process writes: sharded scoring (`ms-rm score`, `ms-rm score-images` in test_score_images.py),
the data-parallel ReFL gradient (every LoRA factor) and the `ms-rm refl` loop.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ms_rm.core.distributed import World, shard_bounds
from ms_rm_parity.compare import FP32_BOUND, max_rel_error

from helpers import converted_checkpoint, ms_rm_command, msrun

def test_shards_cover_the_rows_in_order():
    assert shard_bounds(5, 2) == [slice(0, 3), slice(3, 5)]
    assert shard_bounds(4, 4) == [slice(i, i + 1) for i in range(4)]
    one = World()
    assert one.shard(7) == slice(0, 7) and one.is_main
    np.testing.assert_array_equal(one.gather_rows(np.arange(6.0).reshape(3, 2), 3), np.arange(6.0).reshape(3, 2))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    _, converted = converted_checkpoint(root / "rm")
    from ms_rm import DiffusionRM

    backbone = DiffusionRM.from_pretrained(converted).config.backbone
    rng = np.random.default_rng(0)
    batch = 5                                                   # shards of 3 and 2
    np.savez(root / "inputs.npz", latents=rng.standard_normal((batch, backbone.in_channels, 8, 8), dtype=np.float32),
             encoder_hidden_states=rng.standard_normal((batch, 6, backbone.joint_attention_dim), dtype=np.float32),
             pooled_projections=rng.standard_normal((batch, backbone.pooled_projection_dim), dtype=np.float32))
    return root, converted


@pytest.mark.slow
def test_sharded_score_equals_one_process(tiny):
    from ms_rm.cli import main

    root, converted = tiny
    common = ["score", converted, "--inputs", str(root / "inputs.npz"), "--u", "0.4", "--seed", "3", "--features"]
    assert main(common + ["--out", str(root / "one.npz")]) == 0
    code, logs = msrun(ms_rm_command(), *common, "--out", root / "two.npz", log_dir=root / "logs-score")
    assert code == 0, logs[-3000:]
    one, two = np.load(root / "one.npz"), np.load(root / "two.npz")
    assert sorted(one.files) == sorted(two.files)
    for key in one.files:
        assert one[key].shape == two[key].shape, key
        assert max_rel_error(two[key], one[key]) <= FP32_BOUND, key      # GEMM blocking follows the batch size


@pytest.mark.slow
def test_a_failing_rank_fails_the_job_and_leaves_no_output(tiny):
    root, converted = tiny
    np.savez(root / "short.npz", **{k: v[:1] for k, v in np.load(root / "inputs.npz").items()})   # 1 sample, 2 workers
    code, logs = msrun(ms_rm_command(), "score", converted, "--inputs", root / "short.npz", "--u", "0.4",
                       "--out", root / "never.npz", log_dir=root / "logs-fail")
    assert code != 0
    assert "1 samples for 2 workers" in logs
    assert not (root / "never.npz").exists()


WORKER = '''
import sys
import numpy as np
from ms_rm.core.distributed import init_world

world = init_world()                          # first: msrun's scheduler process stays in here
from ms_rm import DiffusionRM, SD3Generator
from ms_rm.training.refl import ReFLObjective, refl_loss_and_grads

pipeline, rm_folder, inputs, out = sys.argv[1:5]
a = np.load(inputs)
generator = SD3Generator.from_pretrained(pipeline, mode="pynative")
generator.add_lora(rank=2, alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], seed=0)
rng = np.random.default_rng(1)
for p in generator.lora_parameters():         # lora_B = 0 at init would zero the A gradients
    p.set_data(type(p.data)(rng.standard_normal(p.shape).astype(np.float32) * 0.1))
rm = DiffusionRM.from_pretrained(rm_folder, mode="pynative")
rows = world.shard(a["x_t"].shape[0])
loss, grads = refl_loss_and_grads(ReFLObjective(generator, rm), a["x_t"][rows], 700.0, 0.7, a["ehs"][rows],
                                  a["pooled"][rows], 0.4, a["rm_noise"][rows], graph=False)
grads, loss = world.mean(grads), world.mean([loss])[0]
if world.is_main:
    np.savez(out, loss=loss.asnumpy(), **{p.name: g.asnumpy() for p, g in zip(generator.lora_parameters(), grads)})
'''


@pytest.mark.slow
def test_data_parallel_refl_gradient_equals_the_whole_batch_gradient(tmp_path):
    from ms_rm_parity.generator import _reference

    _reference(0, str(tmp_path / "pipeline"))
    _, rm = converted_checkpoint(tmp_path / "rm")
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "inputs.npz", x_t=rng.standard_normal((4, 16, 8, 8), dtype=np.float32),
             ehs=rng.standard_normal((4, 7, 48), dtype=np.float32), pooled=rng.standard_normal((4, 40), dtype=np.float32),
             rm_noise=rng.standard_normal((4, 16, 8, 8), dtype=np.float32))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    args = [tmp_path / "pipeline", rm, tmp_path / "inputs.npz"]
    single = subprocess.run([sys.executable, str(script), *map(str, args), str(tmp_path / "one.npz")],
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    code, logs = msrun(script, *args, tmp_path / "two.npz", log_dir=tmp_path / "logs")
    assert code == 0, logs[-3000:]
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert sorted(one.files) == sorted(two.files) and len(one.files) == 1 + 56
    worst = max(max_rel_error(two[k], one[k]) for k in one.files)
    assert worst <= FP32_BOUND, worst
    assert np.abs(one["transformer.transformer_blocks.0.attn.to_q.lora_A"]).max() > 0


@pytest.mark.slow
def test_data_parallel_refl_command_matches_one_process(tmp_path):
    from ms_rm.cli import main
    from ms_rm_parity.generator import _reference

    _reference(0, str(tmp_path / "pipeline"))
    _, rm = converted_checkpoint(tmp_path / "rm")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "pool.npz", prompt_embeds=rng.standard_normal((3, 7, 48), dtype=np.float32),
             pooled_prompt_embeds=rng.standard_normal((3, 40), dtype=np.float32))
    common = ["refl", str(tmp_path / "pipeline"), "--reward", rm, "--embeds", str(tmp_path / "pool.npz"), "--rank", "2",
              "--alpha", "4", "--batch-size", "2", "--steps", "2", "--num-inference-steps", "3", "--step-range", "1",
              "2", "--guidance", "1.0", "--height", "64", "--width", "64", "--mode", "pynative", "--no-progress"]
    assert main(common + ["--out", str(tmp_path / "one")]) == 0
    code, logs = msrun(ms_rm_command(), *common, "--out", tmp_path / "two", log_dir=tmp_path / "logs")
    assert code == 0, logs[-3000:]
    one = json.load(open(tmp_path / "one" / "state.json"))
    two = json.load(open(tmp_path / "two" / "state.json"))
    assert two["step"] == 2 and [h["k"] for h in two["history"]] == [h["k"] for h in one["history"]]
    for a, b in zip(one["history"], two["history"]):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(a["loss"]), (a, b)
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one"))   # one writer, whole folder
