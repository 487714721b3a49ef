"""Parity of the image-scoring encoders: ms_rm's SD3 VAE encoder and SD3 prompt encoding.

Two harness cases, fp32 only, each on tiny random models built here and saved in their real
formats (diffusers `save_pretrained`, transformers `save_pretrained`):

* sd3-vae: diffusers' AutoencoderKL.encode (posterior mean, logvar, the scaled mode latents,
  and a scaled sample with a given noise) against ms_rm.vae.encoder, images 32x32 and 24x40;
* sd3-prompts: diffusers' StableDiffusion3Pipeline.encode_prompt (the CLIP-L / CLIP-G part and
  the T5 part of prompt_embeds, pooled) against ms_rm.encoders.sd3_prompts, with one prompt longer than both
  token limits.
"""

from __future__ import annotations

import tempfile
from typing import Dict, List

import numpy as np
import torch

from .compare import compare_stages
from .harness import FP32_BOUND, Report, environment, measured_stages
from .reference import as_torch

PROMPTS = ["a red cube on a table", "the blue sky",
           "a photo of a cat and a dog on a table under the blue sky, " * 6]
T5_TOKENS = 16


def _vae_stages(seed: int, mode: str, folder: str, scale: float = 1.0) -> Dict[str, Dict[str, np.ndarray]]:
    """Posterior moments, mode and sampled latents; at a large `scale` (kernels, matrices, GroupNorm
    weights, vae_reference.build_reference_vae) also the encode in float64 ("ref64"), for the
    measured bounds."""
    import copy

    from ms_rm.vae.encoder import load_vae_encoder

    from .vae_reference import build_reference_vae, tiny_vae_config

    reference = build_reference_vae(tiny_vae_config(), seed=seed, matrix_scale=scale, norm_scale=scale)
    reference64 = copy.deepcopy(reference).to(torch.float64) if scale != 1.0 else None
    reference.save_pretrained(folder, safe_serialization=True)
    ours = load_vae_encoder(folder, mode=mode)
    rng = np.random.default_rng(seed)
    shift, factor = reference.config.shift_factor or 0.0, reference.config.scaling_factor
    out: Dict[str, Dict[str, np.ndarray]] = {"ours": {}, "ref": {}, "ref64": {}}
    for h, w in ((32, 32), (24, 40)):
        pixels = rng.uniform(-1, 1, (2, 3, h, w)).astype(np.float32)
        noise = rng.standard_normal((2, 16, h // 8, w // 8), dtype=np.float32)
        tag = f"{h}x{w}"
        for side, model, dtype in (("ref", reference, torch.float32), ("ref64", reference64, torch.float64)):
            if model is None:
                continue
            with torch.no_grad():
                posterior = model.encode(as_torch(pixels, dtype)).latent_dist
            sampled = (posterior.mean + posterior.std * as_torch(noise, dtype) - shift) * factor
            out[side].update({f"mean_{tag}": posterior.mean.numpy(), f"logvar_{tag}": posterior.logvar.numpy(),
                              f"latents_{tag}": ((posterior.mode() - shift) * factor).numpy(),
                              f"sampled_{tag}": sampled.numpy()})
        mean, logvar = np.split(ours.moments(pixels).asnumpy(), 2, axis=1)
        out["ours"].update({f"mean_{tag}": mean, f"logvar_{tag}": logvar,
                            f"latents_{tag}": ours.encode(pixels).asnumpy(),
                            f"sampled_{tag}": ours.encode(pixels, sample=True, noise=noise).asnumpy()})
    if reference64 is None:
        del out["ref64"]
    return out


def _prompt_stages(seed: int, folder: str) -> Dict[str, Dict[str, np.ndarray]]:
    from ms_rm.encoders.sd3_prompts import SD3PromptEncoder

    from .text_reference import reference_encode_prompt, write_sd3_text_folder

    components = write_sd3_text_folder(folder, seed=seed, t5_width=96, clip_widths=(32, 48))
    ref_embeds, ref_pooled = reference_encode_prompt(components, PROMPTS, T5_TOKENS, 96)
    embeds, pooled = SD3PromptEncoder.from_pretrained(folder, max_sequence_length=T5_TOKENS,
                                                      joint_attention_dim=96).encode(PROMPTS)
    embeds = embeds.asnumpy()
    return {"ref": {"clip_embeds": ref_embeds[:, :77], "t5_embeds": ref_embeds[:, 77:], "pooled": ref_pooled},
            "ours": {"clip_embeds": embeds[:, :77], "t5_embeds": embeds[:, 77:], "pooled": pooled.asnumpy()}}


ENCODER_CASES = {
    "sd3-vae": "SD3 VAE encoder vs diffusers AutoencoderKL.encode (mean, logvar, scaled mode and sample)",
    "sd3-prompts": "SD3 prompt encoding (mindone CLIP-L, CLIP-G, T5) vs diffusers encode_prompt",
    "sd3-vae-large-weights": "sd3-vae with every kernel, matrix and GroupNorm weight 3x: SiLU inputs beyond 15, "
                             "attention logits beyond 100, the posterior's logvar (exp of it and of its half) "
                             "beyond 8",
}


def run_encoder_case(name: str, modes: List[str], dtype: str, seed: int, ms_device: str,
                     torch_device: str) -> List[Report]:
    """One report per mode (the prompt encoders always run compiled: one report, graph)."""
    if dtype != "fp32":
        raise ValueError(f"the encoder cases compare fp32 only, not {dtype}")
    from .scales import MATRIX_SCALE

    reports = []
    for mode in (modes if name.startswith("sd3-vae") else ["graph"]):
        with tempfile.TemporaryDirectory() as folder:
            if name.startswith("sd3-vae"):
                stages = _vae_stages(seed, mode, folder, MATRIX_SCALE if name == "sd3-vae-large-weights" else 1.0)
            else:
                stages = _prompt_stages(seed, folder)
        if "ref64" in stages:          # the large-weight case: bounds measured from torch's own fp32 error
            results = measured_stages(stages["ours"], stages["ref"], stages["ref64"])
        else:
            results = compare_stages(stages["ours"], stages["ref"], {"default": FP32_BOUND})
        reports.append(Report(name, ENCODER_CASES[name], mode, dtype, seed, results,
                              environment=environment(ms_device, torch_device)))
    return reports
