"""Generators: SD3Generator (the whole SD3 / SD3.5 transformer of ms_rm.backbones with its
flow-matching sampler, LoRA and loading) and the sampler's steps, which turn prompt embeddings and
initial noise into latents; ms_rm.vae.decoder turns latents into images."""
