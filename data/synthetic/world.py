"""The planted truth of the synthetic ads world: entities, their latents and the label model.

Everything here is fixed at creation from the seed; nothing depends on the events drawn later, so
the truth of any day can be recomputed on its own (evaluation reads it back from ``truth/``).

Glossary: U users, P Pins (over the whole horizon, including those born later), K latent width,
Q intent width, C categories (interest clusters), N rows of a chunk.

The label model (probabilities are written beside every row, so evaluation can report the oracle
AUC as the ceiling)::

    a      = <u_d, p_d>                                   affinity of user and Pin latents on day d
    click  ~ sigmoid(b_click + 4 a + user_bias + pin_bias + surface_bias + 0.3 log1p(past clicks on
             the advertiser) + 0.2 sin(2 pi hour / 24))
    good   ~ click * sigmoid(b_good + 2 a + pin_quality)              dwell > 30 s (paper Table 3)
    cc     ~ click * sigmoid(b_cc + 3 <q_u, r_p> + shopper + adv_cvr)   click-through conversion
    vc     ~ (1 - click) * sigmoid(b_vc + 3 <q_u, r_p> + shopper + adv_cvr)   view-through
    conversion = cc or vc

with every latent a unit vector that drifts: ``u_d = cos(theta d) u_0 + sin(theta d) v`` (v a unit
direction orthogonal to u_0), so day-to-day similarity is high but not one. The conversion-intent
latents q, r appear only in the cvr log's labels: the signal that log carries and the ctr log lacks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data.synthetic.config import WorldConfig

SURFACES = ("home_feed", "related_pins", "search")
SURFACE_MIX = np.array([0.5, 0.3, 0.2])
SURFACE_BIAS = np.array([0.0, 0.3, 0.6])
PLATFORMS = ("ios", "android", "web")
N_AGE_BUCKETS = 7
N_COUNTRIES = 20
N_GENDERS = 3
MAX_INTERESTS = 4

# Intercepts, tuned so the base rates look like ads logs a model can still learn from:
# click ~ 4-6 %, good click ~ 40 % of clicks, conversion ~ 1-2 % of cvr impressions.
B_CLICK, B_GOOD, B_CC, B_VC = -4.0, -0.6, -2.0, -7.0


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _drift_direction(rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
    """A unit vector per row, orthogonal to ``base`` (rows unit-norm)."""
    v = rng.standard_normal(base.shape).astype(np.float32)
    v -= (v * base).sum(-1, keepdims=True) * base
    return _unit(v)


def _lifetimes(rng: np.random.Generator, n0: int, per_day: int, days: int, death_rate: float):
    """Birth and death day of every entity (alive on days birth <= d < death)."""
    births = np.concatenate([np.zeros(n0, np.int32), np.repeat(np.arange(1, days, dtype=np.int32), per_day)])
    life = rng.geometric(death_rate, size=births.size).astype(np.int64)
    deaths = np.minimum(births + life, np.iinfo(np.int32).max).astype(np.int32)
    return births, deaths


@dataclass
class World:
    """Arrays of the planted truth; see the module docstring for the model."""

    cfg: WorldConfig
    centers: np.ndarray  # [C, K] unit cluster centres
    user_birth: np.ndarray  # [U] int32
    user_death: np.ndarray  # [U] int32
    user_cluster: np.ndarray  # [U, 2] int32: primary, secondary interest cluster
    user_latent0: np.ndarray  # [U, K] unit
    user_drift: np.ndarray  # [U, K] unit, orthogonal to user_latent0
    user_intent: np.ndarray  # [U, Q] conversion intent q_u
    user_activity: np.ndarray  # [U] float: relative impression rate
    user_bias: np.ndarray  # [U]
    user_shopper: np.ndarray  # [U]: propensity to convert (logit offset)
    user_gender: np.ndarray  # [U] int
    user_age: np.ndarray  # [U] int
    user_country: np.ndarray  # [U] int
    user_platform: np.ndarray  # [U] int: preferred platform
    user_interests: np.ndarray  # [U, MAX_INTERESTS] int, -1 padded: curated interests
    pin_birth: np.ndarray  # [P] int32
    pin_death: np.ndarray  # [P] int32
    pin_campaign: np.ndarray  # [P] int
    pin_advertiser: np.ndarray  # [P] int
    pin_category: np.ndarray  # [P] int
    pin_latent0: np.ndarray  # [P, K]
    pin_drift: np.ndarray  # [P, K]
    pin_intent: np.ndarray  # [P, Q] r_p
    pin_popularity: np.ndarray  # [P] float: Zipf serving weight
    pin_bias: np.ndarray  # [P]
    pin_quality: np.ndarray  # [P]: drives good clicks
    advertiser_converts: np.ndarray  # [A] bool: conversion-objective advertiser
    advertiser_cvr: np.ndarray  # [A]: conversion logit offset
    user_projection: np.ndarray  # [K, pretrained_dim]: the pretrained-feature "model"
    pin_projection: np.ndarray  # [K, pretrained_dim]

    @classmethod
    def create(cls, cfg: WorldConfig, seed: int) -> "World":
        rng = np.random.default_rng([seed, 0x57A7])
        K, Q, C = cfg.latent_dim, cfg.intent_dim, cfg.n_categories
        centers = _unit(rng.standard_normal((C, K)).astype(np.float32))
        cluster_pop = 1.0 / np.arange(1, C + 1) ** 0.8  # some interests are more common
        cluster_pop /= cluster_pop.sum()

        # Users ----------------------------------------------------------------------------
        ub, ud = _lifetimes(rng, cfg.n_users, cfg.new_users_per_day, cfg.days, cfg.user_death_rate)
        U = ub.size
        primary = rng.choice(C, size=U, p=cluster_pop)
        secondary = rng.choice(C, size=U, p=cluster_pop)
        mix = 0.75 * centers[primary] + 0.35 * centers[secondary]
        ulat = _unit(mix + 0.45 * rng.standard_normal((U, K)).astype(np.float32))
        # Demographics correlate with the primary interest, so they carry (weak) signal.
        cluster_age = rng.integers(0, N_AGE_BUCKETS, size=C)
        cluster_female = rng.uniform(0.2, 0.8, size=C)
        age = np.clip(cluster_age[primary] + rng.integers(-1, 2, size=U), 0, N_AGE_BUCKETS - 1)
        gender = np.where(rng.random(U) < 0.1, 0, np.where(rng.random(U) < cluster_female[primary], 1, 2))
        country_pop = 1.0 / np.arange(1, N_COUNTRIES + 1) ** 1.2
        country = rng.choice(N_COUNTRIES, size=U, p=country_pop / country_pop.sum())
        interests = np.full((U, MAX_INTERESTS), -1, np.int32)
        interests[:, 0] = np.where(rng.random(U) < 0.85, primary, rng.integers(0, C, U))
        interests[:, 1] = np.where(rng.random(U) < 0.6, secondary, -1)
        noise_cat = rng.integers(0, C, size=(U, 2))
        interests[:, 2:] = np.where(rng.random((U, 2)) < 0.3, noise_cat, -1)
        interests = _pack_left(interests)

        # Advertisers, campaigns, Pins ------------------------------------------------------
        A = cfg.n_advertisers
        adv_cat = rng.choice(C, size=A, p=cluster_pop)
        adv_converts = rng.random(A) < cfg.conversion_advertiser_frac
        adv_converts[rng.integers(0, A)] = True  # the cvr log must never be empty
        camp_adv = np.concatenate([np.arange(A), rng.integers(0, A, cfg.n_campaigns - A)])
        camp_cat = np.where(rng.random(cfg.n_campaigns) < 0.9, adv_cat[camp_adv], rng.integers(0, C, cfg.n_campaigns))
        pb, pd = _lifetimes(rng, cfg.n_pins, cfg.new_pins_per_day, cfg.days, cfg.pin_death_rate)
        P = pb.size
        pin_camp = rng.integers(0, cfg.n_campaigns, size=P)
        pin_cat = camp_cat[pin_camp]
        plat = _unit(centers[pin_cat] + 0.6 * rng.standard_normal((P, K)).astype(np.float32))
        popularity = 1.0 / rng.permutation(np.arange(1, P + 1)) ** 0.9

        return cls(
            cfg=cfg,
            centers=centers,
            user_birth=ub,
            user_death=ud,
            user_cluster=np.stack([primary, secondary], 1).astype(np.int32),
            user_latent0=ulat,
            user_drift=_drift_direction(rng, ulat),
            user_intent=_unit(rng.standard_normal((U, Q)).astype(np.float32)),
            user_activity=rng.lognormal(0.0, 1.0, size=U),
            user_bias=rng.normal(0.0, 0.3, size=U),
            user_shopper=rng.normal(0.0, 0.7, size=U),
            user_gender=gender.astype(np.int32),
            user_age=age.astype(np.int32),
            user_country=country.astype(np.int32),
            user_platform=rng.choice(len(PLATFORMS), size=U, p=[0.45, 0.35, 0.2]).astype(np.int32),
            user_interests=interests,
            pin_birth=pb,
            pin_death=pd,
            pin_campaign=pin_camp.astype(np.int32),
            pin_advertiser=camp_adv[pin_camp].astype(np.int32),
            pin_category=pin_cat.astype(np.int32),
            pin_latent0=plat,
            pin_drift=_drift_direction(rng, plat),
            pin_intent=_unit(rng.standard_normal((P, Q)).astype(np.float32)),
            pin_popularity=popularity,
            pin_bias=rng.normal(0.0, 0.3, size=P),
            pin_quality=rng.normal(0.0, 0.5, size=P),
            advertiser_converts=adv_converts,
            advertiser_cvr=rng.normal(0.0, 0.5, size=A),
            user_projection=_orthonormal(rng, K, cfg.pretrained_dim),
            pin_projection=_orthonormal(rng, K, cfg.pretrained_dim),
        )

    # ---- the truth on a given day --------------------------------------------------------
    def user_latent(self, users: np.ndarray, day: int) -> np.ndarray:
        """``[N, K]`` unit latents of ``users`` on ``day``."""
        return _rotate(self.user_latent0[users], self.user_drift[users], day, self.cfg.drift_per_day)

    def pin_latent(self, pins: np.ndarray, day: int) -> np.ndarray:
        return _rotate(self.pin_latent0[pins], self.pin_drift[pins], day, self.cfg.drift_per_day)

    def alive_users(self, day: int) -> np.ndarray:
        return np.flatnonzero((self.user_birth <= day) & (day < self.user_death))

    def alive_pins(self, day: int) -> np.ndarray:
        return np.flatnonzero((self.pin_birth <= day) & (day < self.pin_death))

    def probabilities(
        self,
        users: np.ndarray,
        pins: np.ndarray,
        day: int,
        surface: np.ndarray,
        hour: np.ndarray,
        past_advertiser_clicks: np.ndarray,
    ) -> dict[str, np.ndarray]:
        """True probabilities of every label for N (user, Pin, context) rows; each ``[N]``."""
        affinity = (self.user_latent(users, day) * self.pin_latent(pins, day)).sum(-1)
        p_click = _sigmoid(
            B_CLICK
            + 4.0 * affinity
            + self.user_bias[users]
            + self.pin_bias[pins]
            + SURFACE_BIAS[surface]
            + 0.3 * np.log1p(past_advertiser_clicks)
            + 0.2 * np.sin(2 * np.pi * hour / 24.0)
        )
        p_good = _sigmoid(B_GOOD + 2.0 * affinity + self.pin_quality[pins])
        intent = (self.user_intent[users] * self.pin_intent[pins]).sum(-1)
        conv_logit = 3.0 * intent + self.user_shopper[users] + self.advertiser_cvr[self.pin_advertiser[pins]]
        p_cc, p_vc = _sigmoid(B_CC + conv_logit), _sigmoid(B_VC + conv_logit)
        return {
            "click": p_click,
            "good_click": p_click * p_good,
            "good_given_click": p_good,
            "cc_given_click": p_cc,
            "vc_given_no_click": p_vc,
            "click_conversion": p_click * p_cc,
            "view_conversion": (1.0 - p_click) * p_vc,
            "conversion": p_click * p_cc + (1.0 - p_click) * p_vc,
        }


def _rotate(base: np.ndarray, drift: np.ndarray, day: int, theta: float) -> np.ndarray:
    return np.cos(theta * day) * base + np.sin(theta * day) * drift


def _orthonormal(rng: np.random.Generator, n: int, m: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((max(n, m), max(n, m))))
    return q[:n, :m].astype(np.float32)


def _pack_left(x: np.ndarray) -> np.ndarray:
    """Moves the non-negative entries of each row to its front, keeping their order."""
    order = np.argsort(x < 0, axis=1, kind="stable")
    return np.take_along_axis(x, order, axis=1)
