"""Sizes and knobs of the synthetic ads world, and the presets from ``tiny`` to ``large``."""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass


@dataclass(frozen=True)
class WorldConfig:
    """Everything that shapes a synthetic world; with the seed, it fixes every byte written."""

    n_users: int
    """Users alive on day 0 (more are born on later days)."""
    n_pins: int
    """Ad Pins alive on day 0."""
    n_advertisers: int
    n_campaigns: int
    n_categories: int
    """Interest clusters; each advertiser, campaign and Pin has one, users mix two."""
    ctr_events_per_day: int
    """Impressions per day in the engagement (ctr) log."""
    cvr_events_per_day: int
    """Impressions per day in the conversion (cvr) log (conversion-objective campaigns only)."""
    days: int = 7
    start_date: str = "2026-01-01"
    latent_dim: int = 16
    """Width of the planted user/Pin latents."""
    intent_dim: int = 4
    """Width of the conversion-intent latents that only the cvr log reveals."""
    pretrained_dim: int = 16
    """Width of the pretrained-embedding features (noisy views of the latents)."""
    pretrained_noise: float = 0.5
    seq_len: int = 32
    """Engagement-sequence length kept per user."""
    conv_seq_len: int = 16
    """Conversion-sequence length kept per user (cvr log only)."""
    new_user_rate: float = 0.02
    """New users per day, as a fraction of ``n_users``."""
    new_pin_rate: float = 0.05
    user_death_rate: float = 0.01
    """Daily probability that a user stops appearing (churn)."""
    pin_death_rate: float = 0.03
    drift_per_day: float = 0.03
    """Radians per day that every latent rotates towards its drift direction."""
    conversion_advertiser_frac: float = 0.3
    """Advertisers with a conversion objective: their Pins make up the cvr log."""
    chunk_rows: int = 131_072
    """Rows simulated and written at a time: bounds memory whatever the day size."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, int) and not isinstance(v, bool) and f.name != "days" and v < 1:
                raise ValueError(f"world config: {f.name} must be >= 1, got {v}")
        if self.days < 1:
            raise ValueError(f"world config: days must be >= 1, got {self.days}")
        if self.n_campaigns < self.n_advertisers:
            raise ValueError("world config: n_campaigns must be >= n_advertisers (every advertiser runs one)")
        dt.date.fromisoformat(self.start_date)

    @property
    def start(self) -> dt.date:
        return dt.date.fromisoformat(self.start_date)

    @property
    def total_users(self) -> int:
        """Users over the whole horizon: the day-0 ones plus every later birth (table size)."""
        return self.n_users + self.new_users_per_day * (self.days - 1)

    @property
    def total_pins(self) -> int:
        return self.n_pins + self.new_pins_per_day * (self.days - 1)

    @property
    def new_users_per_day(self) -> int:
        return int(round(self.n_users * self.new_user_rate))

    @property
    def new_pins_per_day(self) -> int:
        return int(round(self.n_pins * self.new_pin_rate))


PRESETS: dict[str, WorldConfig] = {
    # Seconds to generate; what unit and end-to-end tests run on.
    "tiny": WorldConfig(
        n_users=400, n_pins=200, n_advertisers=12, n_campaigns=30, n_categories=8,
        ctr_events_per_day=4_000, cvr_events_per_day=2_000, days=4, seq_len=16, conv_seq_len=8,
        chunk_rows=2_048,
    ),
    # `make demo`: big enough that a day trains the downstream baselines well above chance, small
    # enough that the whole daily pipeline runs in minutes on 2 cores.
    "demo": WorldConfig(
        n_users=3_000, n_pins=600, n_advertisers=30, n_campaigns=100, n_categories=8,
        ctr_events_per_day=50_000, cvr_events_per_day=20_000, days=5, seq_len=16, conv_seq_len=8,
    ),
    # Experiments and the training benchmark.
    "small": WorldConfig(
        n_users=20_000, n_pins=5_000, n_advertisers=200, n_campaigns=1_000, n_categories=32,
        ctr_events_per_day=200_000, cvr_events_per_day=60_000,
    ),
    "medium": WorldConfig(
        n_users=200_000, n_pins=50_000, n_advertisers=1_000, n_campaigns=5_000, n_categories=64,
        ctr_events_per_day=1_000_000, cvr_events_per_day=300_000,
    ),
    # Scale tests: >= 1M users, >= 200k Pins, >= 2M events a day.
    "large": WorldConfig(
        n_users=1_000_000, n_pins=200_000, n_advertisers=5_000, n_campaigns=20_000, n_categories=128,
        ctr_events_per_day=2_000_000, cvr_events_per_day=600_000,
    ),
}
