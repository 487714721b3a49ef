"""Files in and out: safetensors and torch readers (one TensorSource surface), the peft LoRA
merge, JSON / YAML reading, atomic writes, and ms_rm's converted-checkpoint folder."""
