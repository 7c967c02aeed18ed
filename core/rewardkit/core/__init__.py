"""Shared by server and training: loading reward models, heads, ABC credit, losses, formatting, checkpoints."""
