"""The synthetic ads world: users, Pins, advertisers and campaigns with planted latents, whose
engagement (ctr) and conversion (cvr) logs are drawn from known probabilities
(../shared/DESIGN.md §Synthetic ads world). Run ``python -m data.synthetic --help``."""

from data.synthetic.config import PRESETS, WorldConfig
from data.synthetic.generator import generate

__all__ = ["PRESETS", "WorldConfig", "generate"]
