"""The synthetic ads world: users, Pins, advertisers and campaigns with planted latents, whose
engagement (ctr) and conversion (cvr) logs are drawn from known probabilities
(../shared/DESIGN.md §Synthetic ads world). Run ``python -m trainer.data.synthetic --help``."""

from trainer.data.synthetic.config import PRESETS, WorldConfig
from trainer.data.synthetic.generator import generate

__all__ = ["PRESETS", "WorldConfig", "generate"]
