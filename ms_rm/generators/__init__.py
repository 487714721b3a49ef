"""Generators: the full diffusion transformers, flow-matching samplers and VAE decoders that turn
prompt embeddings and initial noise into latents and images (SD3 / SD3.5)."""
