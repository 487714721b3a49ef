"""The torch reference side of ms_rm and the harness that compares it with ms_rm, stage by stage.

Needs the `reference` extra (torch, diffusers, peft). See `python -m ms_rm_parity --help`.
"""
