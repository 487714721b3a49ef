"""ms_rm inside other training frameworks: `flow_grpo` registers ms_rm's scorers with Flow-GRPO-MS."""
