"""Backends (local, modal), verl launch translation, checkpoints and data preparation."""
