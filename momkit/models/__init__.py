"""Models: MoMLM (embedding, blocks of mixer + SwiGLU, tied head) with generate()."""

from momkit.models.lm import LMOutput, MoMLM

__all__ = ["LMOutput", "MoMLM"]
