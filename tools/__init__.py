"""Command-line entry points (`ms-rm ...`): thin wrappers over library code."""
