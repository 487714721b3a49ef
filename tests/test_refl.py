"""One ReFL step against the same recipe in torch (diffusers + peft + the torch reward model)."""

from ms_rm_parity.refl_parity import run_refl_case


def test_refl_step_loss_and_every_lora_gradient_match_torch():
    for report in run_refl_case("sd3-refl", ["graph", "pynative"], "fp32", 0, "CPU", "cpu"):
        failing = [(r.stage, r.max_rel, r.bound) for r in report.stages if not r.passed]
        assert report.passed, (report.mode, failing)
        assert report.stages[0].stage == "loss" and len(report.stages) == 1 + 56
        assert max(r.max_rel for r in report.stages) <= 1e-5


def test_refl_training_raises_the_reward_and_its_lora_loads_in_peft(tmp_path):
    """A short ReFL run on tiny models raises the reward on held-out noise; the LoRA it saves loads in
    peft and moves diffusers' transformer output as it moves ours."""
    import json

    import numpy as np
    import torch
    from diffusers import SD3Transformer2DModel
    from peft import PeftModel

    from ms_rm import DiffusionRM, SD3Generator
    from ms_rm.training.refl import ReFLObjective, ReFLSettings, refl_loss_and_grads, train_refl
    from ms_rm_parity.generator import _reference

    from helpers import converted_checkpoint

    _reference(0, str(tmp_path / "pipeline"))
    _, converted = converted_checkpoint(tmp_path / "rm")
    generator = SD3Generator.from_pretrained(str(tmp_path / "pipeline"))
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    generator.add_lora(rank=4, alpha=4, target_modules=targets, seed=0)
    rm = DiffusionRM.from_pretrained(converted)
    rng = np.random.default_rng(0)
    pool = [rng.standard_normal((3, 7, 48), dtype=np.float32), rng.standard_normal((3, 40), dtype=np.float32)]
    negatives = [np.zeros_like(pool[0]), np.zeros_like(pool[1])]
    held_out = rng.standard_normal((3, 16, 16, 16), dtype=np.float32)
    eps = rng.standard_normal((3, 16, 16, 16), dtype=np.float32)
    sigmas, timesteps = generator.schedule(4)

    def reward():
        loss, _ = refl_loss_and_grads(ReFLObjective(generator, rm), held_out, float(timesteps[2]), float(sigmas[2]),
                                      pool[0], pool[1], 0.4, eps)
        return 2.0 - float(loss)

    before = reward()
    settings = ReFLSettings(steps=12, batch_size=2, num_inference_steps=4, step_range=(1, 3), guidance_scale=1.0,
                            lr=5e-3, seed=1, grad_accumulation=2)
    history = train_refl(generator, rm, *pool, *negatives, settings, str(tmp_path / "lora"), (4, 4, targets),
                         latent_hw=(16, 16), progress=False)
    assert len(history) == 12 and all(np.isfinite(h["loss"]) for h in history)
    after = reward()
    print(f"\nReFL, 12 steps: held-out mean reward {before:.4f} -> {after:.4f}; per-step mean reward "
          f"{np.mean([h['mean_reward'] for h in history[:4]]):.4f} (first 4) -> "
          f"{np.mean([h['mean_reward'] for h in history[-4:]]):.4f} (last 4)")
    assert after > before + 0.01, (before, after)
    assert json.load(open(tmp_path / "lora" / "state.json"))["step"] == 12

    base = SD3Transformer2DModel.from_pretrained(str(tmp_path / "pipeline" / "transformer")).eval()
    x, t = torch.from_numpy(held_out), torch.full((3,), float(timesteps[2]))
    with torch.no_grad():
        plain = base(hidden_states=x, encoder_hidden_states=torch.from_numpy(pool[0]),
                     pooled_projections=torch.from_numpy(pool[1]), timestep=t).sample.numpy()
        adapted = PeftModel.from_pretrained(base, str(tmp_path / "lora")).eval()
        theirs = adapted(hidden_states=x, encoder_hidden_states=torch.from_numpy(pool[0]),
                         pooled_projections=torch.from_numpy(pool[1]), timestep=t).sample.numpy()
    merged = SD3Generator.from_pretrained(str(tmp_path / "pipeline"), lora=str(tmp_path / "lora"))
    from mindspore import Tensor

    ours = merged.run("velocity", Tensor(held_out), Tensor(t.numpy()), Tensor(pool[0]), Tensor(pool[1]),
                      Tensor(merged.transformer.positions(16, 16))).asnumpy()
    assert np.abs(theirs - plain).max() > 1e-3                      # the adapter changes the output
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5 * np.abs(theirs).max())
