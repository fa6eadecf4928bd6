"""Day-by-day simulation of the synthetic ads world: who sees which ad, what they do, and the
features a production log would carry for it.

Features are those of a daily batch pipeline: sequences and counters are as of the start of the
day (yesterday's events are folded in overnight, :meth:`DayState.end_of_day`), so a row never sees
its own label. Each day is simulated in chunks of ``cfg.chunk_rows`` rows, so memory is bounded by
the entity count (state) plus one chunk, whatever the number of events.

Glossary: N rows of a chunk, L sequence length, U users, P Pins.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from data.synthetic.world import PLATFORMS, SURFACE_MIX, World

SECONDS_PER_DAY = 86_400
TARGETED_FRAC = 0.6
"""Share of impressions whose ad is drawn from the user's own interests (ad targeting)."""
ACTION_CLICK, ACTION_GOOD_CLICK, ACTION_CONVERSION = 1, 2, 3
N_ACTIONS = 4  # 0 is never written; ids 1..3 above


class Sampler:
    """Draws users by activity and Pins by targeting and popularity, for one source on one day."""

    def __init__(self, world: World, day: int, source: str) -> None:
        self.world = world
        users = world.alive_users(day)
        weight = world.user_activity[users]
        if source == "cvr":  # shoppers are over-represented among conversion-campaign impressions
            weight = weight * np.exp(world.user_shopper[users])
        self.users, self.user_cdf = users, np.cumsum(weight)

        pins = world.alive_pins(day)
        if source == "cvr":
            pins = pins[world.advertiser_converts[world.pin_advertiser[pins]]]
        if pins.size == 0:
            raise ValueError(f"day {day}: no live Pins for the {source} log; grow n_pins or lower pin_death_rate")
        C = world.cfg.n_categories
        cat = world.pin_category[pins]
        order = np.argsort(cat, kind="stable")
        self.pins, cat = pins[order], cat[order]
        pop = world.pin_popularity[self.pins]
        self.cat_mass = np.bincount(cat, weights=pop, minlength=C)
        # Within-category CDFs laid end to end: category c owns keys in (c, c + 1].
        csum = np.cumsum(pop)
        start = np.searchsorted(cat, np.arange(C))
        before = np.concatenate([[0.0], csum])[start]
        within = (csum - before[cat]) / self.cat_mass[cat]
        last = np.r_[cat[1:] != cat[:-1], True]
        within[last] = 1.0  # exact, so rounding never spills into the next category
        self.keys = cat + within
        self.cat_cdf = np.cumsum(self.cat_mass / self.cat_mass.sum())

    def draw_users(self, rng: np.random.Generator, n: int) -> np.ndarray:
        u = rng.random(n) * self.user_cdf[-1]
        return self.users[np.minimum(np.searchsorted(self.user_cdf, u, side="right"), self.users.size - 1)]

    def draw_pins(self, rng: np.random.Generator, users: np.ndarray) -> np.ndarray:
        n = users.size
        C = self.cat_mass.size
        # Targeted: one of the user's two interest clusters; otherwise any category by ad mass.
        own = self.world.user_cluster[users, (rng.random(n) > 0.7).astype(np.int64)]
        by_mass = np.minimum(np.searchsorted(self.cat_cdf, rng.random(n), side="right"), C - 1)
        cat = np.where(rng.random(n) < TARGETED_FRAC, own, by_mass)
        cat = np.where(self.cat_mass[cat] > 0, cat, by_mass)  # no live ad in that interest today
        idx = np.searchsorted(self.keys, cat + rng.random(n), side="right")
        return self.pins[np.minimum(idx, self.pins.size - 1)]


class History:
    """Per-user ring of recent events, newest first: Pin ids, action types and times (days since
    the world's start). ``[U, L]`` arrays, -1 where empty; filled from the front."""

    def __init__(self, n_users: int, length: int) -> None:
        self.pins = np.full((n_users, length), -1, np.int32)
        self.action = np.zeros((n_users, length), np.int8)
        self.time = np.zeros((n_users, length), np.float32)

    def push(self, users: np.ndarray, pins: np.ndarray, action: np.ndarray, time: np.ndarray) -> None:
        """Prepends events (any order) to their users' histories, newest first."""
        if users.size == 0:
            return
        L = self.pins.shape[1]
        order = np.lexsort((-time, users))
        users, pins, action, time = users[order], pins[order], action[order], time[order]
        first = np.r_[True, users[1:] != users[:-1]]
        rank = np.arange(users.size) - np.maximum.accumulate(np.where(first, np.arange(users.size), 0))
        keep = rank < L
        touched, row = np.unique(users[keep], return_inverse=True)
        k = np.bincount(row, minlength=touched.size)[:, None]  # [T, 1] new events per user
        new = {name: np.zeros((touched.size, L), arr.dtype) for name, arr in self._arrays().items()}
        for name, value in (("pins", pins), ("action", action), ("time", time)):
            new[name][row, rank[keep]] = value[keep]
        j = np.arange(L)[None, :]
        shifted = np.clip(j - k, 0, L - 1)  # old item j - k moves to slot j
        for name, arr in self._arrays().items():
            old = np.take_along_axis(arr[touched], shifted, axis=1)
            arr[touched] = np.where(j < k, new[name], old)

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"pins": self.pins, "action": self.action, "time": self.time}


class PairCounts:
    """Sparse counts per (user, advertiser): sorted int64 keys and their counts."""

    def __init__(self, n_advertisers: int) -> None:
        self.n_adv = n_advertisers
        self.keys = np.zeros(0, np.int64)
        self.counts = np.zeros(0, np.int32)

    def lookup(self, users: np.ndarray, advertisers: np.ndarray) -> np.ndarray:
        q = users.astype(np.int64) * self.n_adv + advertisers
        if self.keys.size == 0:
            return np.zeros(q.size, np.int32)
        i = np.minimum(np.searchsorted(self.keys, q), self.keys.size - 1)
        return np.where(self.keys[i] == q, self.counts[i], 0)

    def add(self, users: np.ndarray, advertisers: np.ndarray) -> None:
        q = users.astype(np.int64) * self.n_adv + advertisers
        keys, inv = np.unique(np.concatenate([self.keys, q]), return_inverse=True)
        weights = np.concatenate([self.counts, np.ones(q.size, np.int32)])
        self.keys, self.counts = keys, np.bincount(inv, weights=weights, minlength=keys.size).astype(np.int32)


@dataclass
class _DayLog:
    """What a day's rows leave behind for the overnight update."""

    users: list[np.ndarray] = field(default_factory=list)
    pins: list[np.ndarray] = field(default_factory=list)
    clicks: list[tuple[np.ndarray, ...]] = field(default_factory=list)  # (user, pin, time, action)
    conversions: list[tuple[np.ndarray, ...]] = field(default_factory=list)


class DayState:
    """Everything the log's features are computed from, as of the start of the current day."""

    def __init__(self, world: World, seed: int) -> None:
        cfg = world.cfg
        U, P = world.user_birth.size, world.pin_birth.size
        self.world, self.seed = world, seed
        self.history = History(U, cfg.seq_len)
        self.conversions = History(U, cfg.conv_seq_len)
        self.adv_clicks = PairCounts(cfg.n_advertisers)
        self.user_imps_1d = np.zeros(U, np.int32)
        self.user_clicks_1d = np.zeros(U, np.int32)
        self.user_imps = np.zeros(U, np.int64)
        self.user_clicks = np.zeros(U, np.int64)
        self.pin_imps_1d = np.zeros(P, np.int32)
        self.pin_clicks_1d = np.zeros(P, np.int32)
        self.pin_imps = np.zeros(P, np.int64)
        self.pin_clicks = np.zeros(P, np.int64)
        self.log = _DayLog()
        self._warm_start()

    def _warm_start(self) -> None:
        """Gives day-0 users a plausible engagement history (up to 30 days before the start),
        drawn from the same targeting model, so day 0 does not start with empty sequences.
        Users are filled a block at a time, to keep memory bounded by the block."""
        sampler = Sampler(self.world, 0, "ctr")
        alive = self.world.alive_users(0)
        L = self.history.pins.shape[1]
        block = self.world.cfg.chunk_rows // L + 1
        for i, start in enumerate(range(0, alive.size, block)):
            rng = np.random.default_rng([self.seed, 0xB0, i])
            users = alive[start : start + block]
            n = np.minimum(rng.poisson(L * np.minimum(self.world.user_activity[users], 2.0) / 2.0), L)
            u = np.repeat(users, n)
            pins = sampler.draw_pins(rng, u)
            time = -rng.uniform(0.02, 30.0, size=u.size).astype(np.float32)
            action = np.where(rng.random(u.size) < 0.4, ACTION_GOOD_CLICK, ACTION_CLICK).astype(np.int8)
            self.history.push(u, pins, action, time)

    # ---- one chunk of rows ------------------------------------------------------------------
    def simulate_chunk(self, sampler: Sampler, source: str, day: int, chunk: int, n_chunks: int, n: int) -> pa.Table:
        """``n`` rows of ``source`` for chunk ``chunk`` of ``day``, in time order."""
        world, cfg = self.world, self.world.cfg
        rng = np.random.default_rng([self.seed, day, 0 if source == "ctr" else 1, chunk])
        users = sampler.draw_users(rng, n)
        pins = sampler.draw_pins(rng, users)
        # Chunk c covers the c-th slice of the day, so files are in time order too.
        offset = np.sort((chunk + rng.random(n)) / n_chunks)  # fraction of the day
        day_start = int(dt.datetime.combine(cfg.start + dt.timedelta(days=day), dt.time(), dt.timezone.utc).timestamp())
        event_time = day_start + (offset * SECONDS_PER_DAY).astype(np.int64)
        hour = (event_time - day_start) // 3600
        surface = rng.choice(len(SURFACE_MIX), size=n, p=SURFACE_MIX)
        platform = np.where(rng.random(n) < 0.8, world.user_platform[users], rng.integers(0, len(PLATFORMS), n))
        advertiser = world.pin_advertiser[pins]
        past_adv_clicks = self.adv_clicks.lookup(users, advertiser)
        p = world.probabilities(users, pins, day, surface, hour, past_adv_clicks)

        click = rng.random(n) < p["click"]
        labels: dict[str, np.ndarray]
        if source == "ctr":
            good = click & (rng.random(n) < p["good_given_click"])
            labels = {"click": click, "good_click": good}
            oracle = {"p_click": p["click"], "p_good_click": p["good_click"]}
            action = np.where(good, ACTION_GOOD_CLICK, ACTION_CLICK)
        else:
            cc = click & (rng.random(n) < p["cc_given_click"])
            vc = ~click & (rng.random(n) < p["vc_given_no_click"])
            labels = {"conversion": cc | vc, "click_conversion": cc, "view_conversion": vc}
            oracle = {
                "p_conversion": p["conversion"],
                "p_click_conversion": p["click_conversion"],
                "p_view_conversion": p["view_conversion"],
            }
            action = np.full(n, ACTION_CLICK)
        t_days = (day + offset).astype(np.float32)
        self.log.users.append(users)
        self.log.pins.append(pins)
        self.log.clicks.append((users[click], pins[click], t_days[click], action[click].astype(np.int8)))
        if source == "cvr":
            conv = labels["conversion"]
            self.log.conversions.append((users[conv], pins[conv], t_days[conv], np.full(conv.sum(), ACTION_CONVERSION, np.int8)))

        cols: dict[str, pa.Array] = {
            "user_id": pa.array(users.astype(np.int64)),
            "pin_id": pa.array(pins.astype(np.int64)),
            "event_time": pa.array(event_time),
            # user features
            "user_gender": pa.array(world.user_gender[users]),
            "user_age_bucket": pa.array(world.user_age[users]),
            "user_country": pa.array(world.user_country[users]),
            "user_interests": _list_column(world.user_interests[users].astype(np.int64)),
            "seq_pin_ids": _list_column(self.history.pins[users].astype(np.int64)),
            "seq_action": _list_column(self.history.action[users].astype(np.int32), self.history.pins[users]),
            "seq_age_days": _list_column(t_days[:, None] - self.history.time[users], self.history.pins[users]),
            "user_impressions_1d": pa.array(self.user_imps_1d[users].astype(np.float32)),
            "user_clicks_1d": pa.array(self.user_clicks_1d[users].astype(np.float32)),
            "user_ctr_smoothed": pa.array(_smoothed(self.user_clicks[users], self.user_imps[users])),
            "user_pretrained": _pretrained(rng, world.user_latent(users, day), world.user_projection, cfg.pretrained_noise),
            # Pin features
            "advertiser_id": pa.array(advertiser.astype(np.int64)),
            "campaign_id": pa.array(world.pin_campaign[pins].astype(np.int64)),
            "category_id": pa.array(world.pin_category[pins].astype(np.int64)),
            "pin_impressions_1d": pa.array(self.pin_imps_1d[pins].astype(np.float32)),
            "pin_clicks_1d": pa.array(self.pin_clicks_1d[pins].astype(np.float32)),
            "pin_ctr_smoothed": pa.array(_smoothed(self.pin_clicks[pins], self.pin_imps[pins])),
            "pin_pretrained": _pretrained(rng, world.pin_latent(pins, day), world.pin_projection, cfg.pretrained_noise),
            # context and interaction features
            "surface": pa.array(surface.astype(np.int32)),
            "hour_of_day": pa.array(hour.astype(np.int32)),
            "platform": pa.array(platform.astype(np.int32)),
            "user_advertiser_clicks": pa.array(past_adv_clicks.astype(np.float32)),
        }
        if source == "cvr":
            conv_pins = self.conversions.pins[users]
            cols["conv_seq_pin_ids"] = _list_column(conv_pins.astype(np.int64))
            cols["conv_seq_age_days"] = _list_column(t_days[:, None] - self.conversions.time[users], conv_pins)
        for name, value in labels.items():
            cols[name] = pa.array(value.astype(np.int8))
        for name, value in oracle.items():
            cols[name] = pa.array(value.astype(np.float32))
        return pa.table(cols)

    # ---- overnight --------------------------------------------------------------------------
    def end_of_day(self) -> None:
        """Folds the day's events into the counters and sequences the next day's rows see."""
        U, P = self.user_imps.size, self.pin_imps.size
        users, pins = np.concatenate(self.log.users), np.concatenate(self.log.pins)
        cu, cp, ct, ca = (np.concatenate(x) for x in zip(*self.log.clicks))
        self.user_imps_1d = np.bincount(users, minlength=U).astype(np.int32)
        self.user_clicks_1d = np.bincount(cu, minlength=U).astype(np.int32)
        self.pin_imps_1d = np.bincount(pins, minlength=P).astype(np.int32)
        self.pin_clicks_1d = np.bincount(cp, minlength=P).astype(np.int32)
        self.user_imps += self.user_imps_1d
        self.user_clicks += self.user_clicks_1d
        self.pin_imps += self.pin_imps_1d
        self.pin_clicks += self.pin_clicks_1d
        self.adv_clicks.add(cu, self.world.pin_advertiser[cp])
        # One push for all of the day's engagements, so the sequence stays newest first.
        engaged = [(cu, cp, ca, ct)]
        if self.log.conversions:
            vu, vp, vt, va = (np.concatenate(x) for x in zip(*self.log.conversions))
            self.conversions.push(vu, vp, va, vt)
            engaged.append((vu, vp, va, vt))
        self.history.push(*(np.concatenate(x) for x in zip(*engaged)))
        self.log = _DayLog()


def _list_column(padded: np.ndarray, mask_from: np.ndarray | None = None) -> pa.ListArray:
    """A list column from a ``[N, L]`` front-packed matrix; entries where ``mask_from < 0``
    (default: the matrix itself) are padding."""
    valid = (padded if mask_from is None else mask_from) >= 0
    offsets = np.concatenate([[0], np.cumsum(valid.sum(1))]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(padded[valid]))


def _smoothed(clicks: np.ndarray, imps: np.ndarray) -> np.ndarray:
    """Click rate with a Beta(1, 24) prior, so new entities read as a typical 4 %."""
    return ((clicks + 1.0) / (imps + 25.0)).astype(np.float32)


def _pretrained(rng: np.random.Generator, latent: np.ndarray, projection: np.ndarray, noise: float) -> pa.Array:
    """A noisy linear view of the latent: what a pretrained content/graph model would give."""
    x = latent @ projection
    x = (x + noise * rng.standard_normal(x.shape).astype(np.float32) / np.sqrt(x.shape[1])).astype(np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])

