"""Files in and out: safetensors and torch readers (one TensorSource surface), the LoRA merge
(peft and diffusers formats), JSON / YAML reading, atomic writes, and ms_rm's converted-checkpoint folder."""
