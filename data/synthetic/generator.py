"""Writes a synthetic ads world to disk: both logs day by day, the spec, and the planted truth.

Layout (see ``data.dataset_writer``)::

    OUT/spec.toml
    OUT/ctr/day=YYYY-MM-DD/part-NNNNN.parquet     engagement log (labels click, good_click)
    OUT/cvr/day=YYYY-MM-DD/part-NNNNN.parquet     conversion log (labels conversion, ...)
    OUT/truth/world.json                          config, seed and label-model constants
    OUT/truth/users.parquet, OUT/truth/pins.parquet   entity latents, lifetimes, attributes
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data.dataset_writer import staged_output, write_part
from data.synthetic import world as world_model
from data.synthetic.config import WorldConfig
from data.synthetic.features import SOURCES, synthetic_spec
from data.synthetic.simulate import DayState, Sampler

log = logging.getLogger("derm.data.synthetic")


def generate(out: str | os.PathLike, cfg: WorldConfig, seed: int = 0, overwrite: bool = False) -> dict:
    """Generates the world into ``out`` (atomically) and returns a summary of what was written."""
    t0 = time.perf_counter()
    world = world_model.World.create(cfg, seed)
    state = DayState(world, seed)
    summary: dict = {"seed": seed, "config": dataclasses.asdict(cfg), "days": [], "rows": {s.name: 0 for s in SOURCES}}
    with staged_output(out, overwrite) as stage:
        synthetic_spec(cfg).dump(stage / "spec.toml")
        _write_truth(stage / "truth", world, seed)
        for day in range(cfg.days):
            date = cfg.start + dt.timedelta(days=day)
            day_summary: dict = {"day": date.isoformat()}
            td = time.perf_counter()
            for source in SOURCES:
                n_total = cfg.ctr_events_per_day if source.name == "ctr" else cfg.cvr_events_per_day
                sampler = Sampler(world, day, source.name)
                n_chunks = math.ceil(n_total / cfg.chunk_rows)
                positives = np.zeros(len(source.labels))
                for chunk in range(n_chunks):
                    n = min(cfg.chunk_rows, n_total - chunk * cfg.chunk_rows)
                    table = state.simulate_chunk(sampler, source.name, day, chunk, n_chunks, n)
                    positives += [pc.sum(table[label]).as_py() for label in source.labels]
                    write_part(table, stage, source.name, date, chunk)
                summary["rows"][source.name] += n_total
                day_summary[source.name] = {"rows": n_total, **{f"{l}_rate": round(float(v) / n_total, 5) for l, v in zip(source.labels, positives)}}
            state.end_of_day()
            secs = time.perf_counter() - td
            rows = cfg.ctr_events_per_day + cfg.cvr_events_per_day
            log.info(
                "day %s (%d/%d): %d rows in %.1fs (%.0f rows/s); ctr click rate %.4f, cvr conversion rate %.4f",
                date, day + 1, cfg.days, rows, secs, rows / secs,
                day_summary["ctr"]["click_rate"], day_summary["cvr"]["conversion_rate"],
            )
            summary["days"].append(day_summary)
        summary["seconds"] = round(time.perf_counter() - t0, 2)
        (stage / "truth" / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _write_truth(path: Path, world: world_model.World, seed: int) -> None:
    """The planted truth, for evaluation: latents and attributes of every entity."""
    path.mkdir(parents=True)
    constants = {k: getattr(world_model, k) for k in ("B_CLICK", "B_GOOD", "B_CC", "B_VC")}
    meta = {
        "seed": seed,
        "config": dataclasses.asdict(world.cfg),
        "label_model": {**constants, "surface_bias": world_model.SURFACE_BIAS.tolist(), "surfaces": world_model.SURFACES},
        "latent_on_day": "cos(drift_per_day * d) * latent0 + sin(drift_per_day * d) * drift",
        "centers": world.centers.tolist(),
        "advertiser_converts": world.advertiser_converts.tolist(),
        "advertiser_cvr": world.advertiser_cvr.tolist(),
    }
    (path / "world.json").write_text(json.dumps(meta, indent=1))

    def vectors(x: np.ndarray) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float32).reshape(-1)), x.shape[1])

    users = {
        "user_id": np.arange(world.user_birth.size, dtype=np.int64),
        "birth_day": world.user_birth, "death_day": world.user_death,
        "primary_cluster": world.user_cluster[:, 0], "secondary_cluster": world.user_cluster[:, 1],
        "activity": world.user_activity, "bias": world.user_bias, "shopper": world.user_shopper,
    }
    pq.write_table(
        pa.table({**{k: pa.array(v) for k, v in users.items()},
                  "latent0": vectors(world.user_latent0), "drift": vectors(world.user_drift),
                  "intent": vectors(world.user_intent)}),
        path / "users.parquet",
    )
    pins = {
        "pin_id": np.arange(world.pin_birth.size, dtype=np.int64),
        "birth_day": world.pin_birth, "death_day": world.pin_death,
        "advertiser_id": world.pin_advertiser, "campaign_id": world.pin_campaign, "category_id": world.pin_category,
        "popularity": world.pin_popularity, "bias": world.pin_bias, "quality": world.pin_quality,
    }
    pq.write_table(
        pa.table({**{k: pa.array(v) for k, v in pins.items()},
                  "latent0": vectors(world.pin_latent0), "drift": vectors(world.pin_drift),
                  "intent": vectors(world.pin_intent)}),
        path / "pins.parquet",
    )
