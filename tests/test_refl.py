"""One ReFL step against the same recipe in torch (diffusers + peft + the torch reward model)."""

from ms_rm_parity.exact64 import float64_sinusoids
from ms_rm_parity.refl_parity import run_refl_case


def test_refl_step_loss_and_every_lora_gradient_match_torch():
    for report in run_refl_case("sd3-refl", ["graph", "pynative"], "fp32", 0, "CPU", "cpu"):
        failing = [(r.stage, r.max_rel, r.bound) for r in report.stages if not r.passed]
        assert report.passed, (report.mode, failing)
        assert report.stages[0].stage == "loss" and len(report.stages) == 1 + 56


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


def _tiny_run(tmp_path, mode="pynative"):
    """A tiny diffusers transformer folder, a converted reward model, a prompt pool."""
    import numpy as np

    from ms_rm import DiffusionRM
    from ms_rm_parity.generator import _reference

    from helpers import converted_checkpoint

    _reference(0, str(tmp_path / "pipeline"))
    _, converted = converted_checkpoint(tmp_path / "rm")
    rng = np.random.default_rng(0)
    pool = [rng.standard_normal((3, 7, 48), dtype=np.float32), rng.standard_normal((3, 40), dtype=np.float32)]
    negatives = [np.zeros_like(pool[0]), np.zeros_like(pool[1])]
    return str(tmp_path / "pipeline"), DiffusionRM.from_pretrained(converted, mode=mode), pool, negatives


def test_a_resumed_refl_run_equals_an_uninterrupted_one(tmp_path):
    """4 steps straight vs 2 steps, a new process's worth of objects, resume to 4: the same history
    and LoRA, bit for bit (so the optimizer state carried over too: Adam's moments shape every
    update); changed settings, another latent size, a stray adapter are refused."""
    import dataclasses
    import json

    import numpy as np
    import pytest

    from ms_rm import InputError, SD3Generator
    from ms_rm.training.refl import ReFLSettings, train_refl

    pipeline, rm, pool, negatives = _tiny_run(tmp_path)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    settings = ReFLSettings(steps=4, batch_size=1, num_inference_steps=3, step_range=(1, 2), guidance_scale=1.0,
                            lr=5e-3, seed=2, grad_accumulation=2, checkpoint_every=2, pretrain_weight=0.0)

    def fresh():
        g = SD3Generator.from_pretrained(pipeline, mode="pynative")
        g.add_lora(rank=4, alpha=4, target_modules=targets, seed=0)
        return g

    run = lambda g, s, out, **kw: train_refl(g, rm, *pool, *negatives, s, str(out), (4, 4, targets),
                                             latent_hw=(8, 8), progress=False, **kw)
    straight = fresh()
    history = run(straight, settings, tmp_path / "straight")
    run(fresh(), dataclasses.replace(settings, steps=2), tmp_path / "resumed")
    assert json.load(open(tmp_path / "resumed" / "state.json"))["step"] == 2
    with pytest.raises(InputError, match="lr: 0.005 there, 0.001 now"):
        run(SD3Generator.from_pretrained(pipeline, lora=str(tmp_path / "resumed"), lora_mode="train", mode="pynative"),
            dataclasses.replace(settings, lr=1e-3), tmp_path / "resumed", resume=True)
    with pytest.raises(InputError, match="latent_hw"):
        train_refl(SD3Generator.from_pretrained(pipeline, lora=str(tmp_path / "resumed"), lora_mode="train",
                                                mode="pynative"), rm, *pool, *negatives, settings,
                   str(tmp_path / "resumed"), (4, 4, targets), latent_hw=(16, 16), progress=False, resume=True)
    with pytest.raises(InputError, match="already exists"):
        run(fresh(), settings, tmp_path / "resumed")
    with pytest.raises(InputError, match="not this run's adapter"):
        run(fresh(), settings, tmp_path / "resumed", resume=True)
    resumed = SD3Generator.from_pretrained(pipeline, lora=str(tmp_path / "resumed"), lora_mode="train", mode="pynative")
    resumed_history = run(resumed, settings, tmp_path / "resumed", resume=True)
    assert [h["loss"] for h in resumed_history] == [h["loss"] for h in history]
    ours, theirs = resumed.lora_state(), straight.lora_state()
    assert ours.keys() == theirs.keys()
    for key in ours:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
    with pytest.raises(InputError, match="checkpoint_every 3 must be a multiple of grad_accumulation"):
        run(fresh(), dataclasses.replace(settings, checkpoint_every=3), tmp_path / "other")
    with pytest.raises(InputError, match="steps 5 must be a multiple of grad_accumulation"):
        run(fresh(), dataclasses.replace(settings, steps=5), tmp_path / "other")


def test_the_pretraining_term_matches_torch(tmp_path):
    """The optional flow-matching term (PretrainObjective): loss and every LoRA gradient vs diffusers + peft."""
    import numpy as np
    import torch
    from diffusers import SD3Transformer2DModel
    from peft import PeftModel

    from ms_rm import SD3Generator
    from ms_rm.training.refl import pretrain_loss_and_grads, save_lora

    from ms_rm_parity.compare import FP32_BOUND, max_rel_error, policy_bound

    pipeline, _, pool, _ = _tiny_run(tmp_path)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    generator = SD3Generator.from_pretrained(pipeline, mode="pynative")
    generator.add_lora(rank=4, alpha=8, target_modules=targets, seed=0)
    rng = np.random.default_rng(5)
    for p in generator.lora_parameters():                 # lora_B = 0 at init would zero the A gradients
        p.set_data(type(p.data)(rng.standard_normal(p.shape).astype(np.float32) * 0.1))
    save_lora(generator, str(tmp_path / "adapter"), 4, 8, targets)
    x0 = rng.standard_normal((2, 16, 8, 8), dtype=np.float32)
    eps = rng.standard_normal((2, 16, 8, 8), dtype=np.float32)
    sigma = np.float32([0.3, 0.8])
    loss, grads = pretrain_loss_and_grads(generator, x0, eps, sigma, pool[0][:2], pool[1][:2], graph=False)

    base = SD3Transformer2DModel.from_pretrained(pipeline + "/transformer")
    model = PeftModel.from_pretrained(base, str(tmp_path / "adapter"), is_trainable=True)
    def torch_run(dtype):
        """(loss, {LoRA factor: gradient}) of the torch model at `dtype`."""
        net = model.to(dtype)
        net.zero_grad()
        x0_t, eps_t, s = (torch.from_numpy(a).to(dtype) for a in (x0, eps, sigma))
        x_s = (1 - s[:, None, None, None]) * x0_t + s[:, None, None, None] * eps_t
        v = net(hidden_states=x_s, encoder_hidden_states=torch.from_numpy(pool[0][:2]).to(dtype),
                pooled_projections=torch.from_numpy(pool[1][:2]).to(dtype), timestep=s * 1000).sample
        torch_loss = ((v - (eps_t - x0_t)) ** 2).mean()
        torch_loss.backward()
        return float(torch_loss), {n.replace("base_model.model.", "").replace(".default", ""):
                                   p.grad.double().numpy().copy() for n, p in net.named_parameters() if "lora_" in n}

    torch_loss, torch_grads = torch_run(torch.float32)
    with float64_sinusoids():                            # float64 all through (ms_rm_parity.exact64)
        _, grads64 = torch_run(torch.float64)
    assert abs(float(loss) - torch_loss) <= FP32_BOUND * abs(torch_loss)
    names = [p.name.split("transformer.", 1)[1] + ".weight" for p in generator.lora_parameters()]
    assert sorted(names) == sorted(torch_grads) and len(names) == 56
    # The tolerance policy: each gradient within policy_bound of torch fp32's own error against float64
    # (the gradients sum over every token, so their rounding grows with the model's size and the CPU).
    worst = {n: (max_rel_error(g.asnumpy(), torch_grads[n]), policy_bound(max_rel_error(torch_grads[n], grads64[n])))
             for n, g in zip(names, grads)}
    failed = {n: v for n, v in worst.items() if v[0] > v[1]}
    assert not failed, failed


def test_the_refl_command_trains_resumes_and_refuses_to_overwrite(tmp_path, capsys):
    import json
    import os

    import numpy as np

    from ms_rm.cli import main

    pipeline, _, pool, _ = _tiny_run(tmp_path)
    np.savez(tmp_path / "pool.npz", prompt_embeds=pool[0], pooled_prompt_embeds=pool[1])
    rm = str(tmp_path / "rm" / "converted")
    common = [pipeline, "--reward", rm, "--out", str(tmp_path / "run"), "--embeds", str(tmp_path / "pool.npz"),
              "--rank", "2", "--alpha", "4", "--batch-size", "1", "--num-inference-steps", "3", "--step-range", "1", "2",
              "--guidance", "1.0", "--height", "64", "--width", "64", "--mode", "pynative", "--no-progress"]
    bad = str(tmp_path / "bad")
    assert main(["refl", *common, "--steps", "2", "--out", bad, "--guidance", "4.5"]) == 2    # no negatives
    np.savez(tmp_path / "narrow.npz", prompt_embeds=pool[0][..., :40], pooled_prompt_embeds=pool[1])
    assert main(["refl", *common, "--steps", "2", "--out", bad, "--embeds", str(tmp_path / "narrow.npz")]) == 2
    assert main(["refl", *common, "--steps", "2", "--out", bad, "--pretrain-weight", "0.5"]) == 2
    assert not os.path.exists(bad)
    assert main(["refl", *common, "--steps", "2"]) == 0
    state = json.load(open(tmp_path / "run" / "state.json"))
    assert state["step"] == 2 and state["settings"]["num_inference_steps"] == 3
    assert main(["refl", *common, "--steps", "3"]) == 2                     # exists: --resume or --force
    assert main(["refl", *common, "--steps", "3", "--resume"]) == 0
    state = json.load(open(tmp_path / "run" / "state.json"))
    assert state["step"] == 3 and [h["step"] for h in state["history"]] == [1, 2, 3]
    assert json.load(open(tmp_path / "run" / "adapter_config.json"))["r"] == 2
    errors = capsys.readouterr().err
    assert "needs the negative prompt's embeddings" in errors and "prompt embeddings 40 (the transformer takes 48)" in errors
    assert "--pretrain-weight needs --pretrain FILE" in errors
