"""The run configs of the training job's two tasks (``trainer/main.py --task``): :class:`RunConfig`
for an upstream DERM model, :class:`DownstreamRunConfig` for a downstream CTR / CVR model. One TOML
file per run plus ``--section.field=value`` overrides, read by the strict parser of
``common.config`` into typed, frozen dataclasses, validated before any process group starts,
unknown keys rejected. Nothing here imports torch.

Example ``run.toml``::

    [data]
    root = "runs/data/small"
    source = "cvr"
    batch_size = 2048

    [train]
    run_dir = "runs/small-cvr"
    mode = "initial"
    days = ["2026-01-01", "2026-01-02"]

    [model]
    token_dim = 64
    [model.user_dhen]
    layers = [["masknet", "transformer"], ["mlp", "dcn"]]

    [optimizer]
    sparse_lr = 0.02

The resolved config is written beside the outputs (``RUN_DIR/config.toml``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from common.config import load_config
from data.synthetic.config import PRESETS
from modules.config import MIXED_PRECISION_MODES, DERMConfig
from modules.downstream_config import DOWNSTREAM_KINDS, DownstreamConfig
from sharding.config import OptimizerConfig


@dataclass(frozen=True)
class DataConfig:
    """Where the events are and how they are batched."""

    root: str = "runs/demo/data"
    """Dataset root (spec.toml and <source>/day=YYYY-MM-DD/). Generated first when missing and
    ``synthetic_preset`` is set, so the default run needs no data of its own."""
    source: str = "ctr"
    """Which source (and so which upstream model) to train: one of the spec's sources."""
    synthetic_preset: str = "tiny"
    """Preset of the synthetic world generated into a missing ``root``; "" never generates."""
    batch_size: int = 512
    """Rows per rank per step."""
    eval_batch_size: int = 4096
    num_workers: int = 0
    """DataLoader worker processes per rank (0: read in the training process)."""


@dataclass(frozen=True)
class TrainConfig:
    """What to train, in which order, and where the outputs go."""

    run_dir: str = "runs/demo/ctr"
    """Snapshots (snapshots/day=YYYY-MM-DD/), TensorBoard (tb/), config and summaries."""
    mode: str = "initial"
    """initial: train ``days`` in order from scratch; incremental: load the latest snapshot before
    ``day``, train ``day`` (paper Appendix B.2)."""
    days: tuple[str, ...] = ()
    """initial mode: days to train, in order (default: every day of the source but the last)."""
    day: str = ""
    """incremental mode: the day to train."""
    eval_day: str = ""
    """Held-out day to evaluate after training (default: the day after the last trained one, if
    the data has it); several, comma-separated, are evaluated together (sparse days); "none"
    skips evaluation."""
    max_steps_per_day: int = 0
    """Cap on steps per day (0: a full pass). For smoke runs."""
    checkpoint_every: int = 0
    """Steps between mid-day checkpoints (``RUN_DIR/snapshots/partial``; 0: none). The same command
    re-run after a failure continues from the last complete day's snapshot, and from the latest
    checkpoint of the day it was training: each example is trained on once (docs/training.md)."""
    log_every: int = 20
    """Steps between progress lines and TensorBoard points."""
    seed: int = 0
    overwrite: bool = False
    """Replace existing snapshots of the days being trained (otherwise refused)."""
    device: str = "auto"
    """auto (cuda when available), cpu or cuda."""
    pipeline: bool = True
    """Use TorchRec's TrainPipelineSparseDist (input distribution overlapped with compute)."""
    mixed_precision: str = "auto"
    """auto, none or bf16. bf16: the model's dense forward under ``torch.autocast`` in bfloat16;
    tables, optimizer state and losses stay float32 (``modules/precision.py``). auto: bf16 where
    the device has bfloat16 matrix units (CUDA GPUs that support it; CPUs with AVX512-BF16 or AMX),
    none elsewhere."""
    threads: int = 0
    """Intra-op CPU threads per rank; 0: the cores this process may use // ranks on this host
    (``sharding.distributed.set_threads``). On a shared machine, set the cores that are yours."""


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model: DERMConfig = field(default_factory=DERMConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)

    def __post_init__(self) -> None:
        check_data_train(self.data, self.train)


def check_data_train(d: DataConfig, t: TrainConfig) -> None:
    """Checks the [data] and [train] sections every run config shares (upstream and downstream)."""
    if t.mode not in ("initial", "incremental"):
        raise ValueError(f"train.mode must be initial or incremental, got {t.mode!r}")
    if t.mode == "incremental" and not t.day:
        raise ValueError("train.mode = incremental needs train.day (--day YYYY-MM-DD)")
    if t.mode == "initial" and t.day:
        raise ValueError("train.day is for incremental mode; initial mode takes train.days")
    if t.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"train.device must be auto, cpu or cuda, got {t.device!r}")
    if t.mixed_precision not in MIXED_PRECISION_MODES:
        raise ValueError(f"train.mixed_precision must be one of {', '.join(MIXED_PRECISION_MODES)}, got {t.mixed_precision!r}")
    if t.threads < 0:
        raise ValueError(f"train.threads must be >= 0 (0: cores // ranks on this host), got {t.threads}")
    for name in ("batch_size", "eval_batch_size"):
        if getattr(d, name) < 1:
            raise ValueError(f"data.{name} must be >= 1, got {getattr(d, name)}")
    if d.synthetic_preset and d.synthetic_preset not in PRESETS:
        raise ValueError(f"data.synthetic_preset must be one of {sorted(PRESETS)} or empty, got {d.synthetic_preset!r}")
    if t.log_every < 1 or t.max_steps_per_day < 0 or d.num_workers < 0 or t.checkpoint_every < 0:
        raise ValueError("train.log_every must be >= 1, train.max_steps_per_day, train.checkpoint_every and data.num_workers >= 0")


# ---- downstream models (paper §3.2, §4.1) -----------------------------------------------------

DERM_NAME = re.compile(r"^(?P<source>[a-z0-9]+)_(?P<entity>user|pin)$")


@dataclass(frozen=True)
class DERMJoinConfig:
    """Which DERM embeddings a downstream model reads, and where they are served from."""

    features: tuple[str, ...] = ()
    """Embeddings to read, each ``{upstream source}_{user|pin}``: any subset of ``ctr_user``,
    ``ctr_pin``, ``cvr_user``, ``cvr_pin`` (Tables 2 and 4). Empty: the no-DERM baseline."""
    store_root: str = ""
    """Folder of embedded feature stores, one per embedding: ``{store_root}/{source}-{entity}``."""
    redis_url: str = ""
    """Read from Redis instead (namespace ``{source}-{entity}``); overrides ``store_root``. No password
    in it: the password comes from ``$DERM_REDIS_PASSWORD`` or the file named by
    ``$DERM_REDIS_PASSWORD_FILE`` (embeddings.redis_store.redis_client)."""
    version_pattern: str = "{source}-{entity}-{day}"
    """Version published for a day (as ``embeddings.publish --version`` was given it)."""
    lag_days: int = 1
    """A row of day d reads the version of day d − lag_days (1: yesterday's, no leakage)."""
    projection_dim: int = 32
    """Width of each embedding after the projection layer (Appendix D.1); 0: no projection."""
    standardize: bool = True
    """Standardize each embedding dimension over the batch before the projection (BatchNorm1d;
    see ``modules.downstream_config.DERMFeature.standardize``). Daily pools share a large common
    direction, and a fresh projection barely sees the small per-dimension spread that tells
    entities apart: without it, the `small` world's CTR model gains nothing from the four
    embeddings (+0.08 ± 0.20 % ROC-AUC over 3 seeds); with it, +7.93 ± 0.67 % (docs/experiments.md,
    "Reading the embeddings")."""
    similarity: bool = False
    """Also give the model the cosine ⟨user, Pin⟩ of each source whose user and Pin embeddings it
    reads (``ctr_user`` with ``ctr_pin``, ``cvr_user`` with ``cvr_pin``): the score the upstream
    model's contrastive task trains. An extension beyond the paper, reported as a row of its own."""

    def __post_init__(self) -> None:
        for name in self.features:
            if not DERM_NAME.match(name):
                raise ValueError(f"derm.features: {name!r} is not {{source}}_{{user|pin}}, e.g. 'ctr_user'")
        if len(set(self.features)) != len(self.features):
            raise ValueError(f"derm.features lists a name twice: {list(self.features)}")
        if self.features and not (self.store_root or self.redis_url):
            raise ValueError("derm.features needs derm.store_root (embedded stores) or derm.redis_url")
        if self.redis_url:  # before the config is written to RUN_DIR/config.toml
            from embeddings.redis_store import check_redis_url

            check_redis_url(self.redis_url)
        for key in ("{source}", "{entity}", "{day}"):
            if key not in self.version_pattern:
                raise ValueError(f"derm.version_pattern needs {key}, got {self.version_pattern!r}")
        if self.similarity and not self.similarity_pairs():
            raise ValueError(f"derm.similarity needs a source's user and Pin embeddings both in derm.features, got {list(self.features)}")
        if self.lag_days < 0 or self.projection_dim < 0:
            raise ValueError("derm.lag_days and derm.projection_dim must be >= 0")

    def similarity_pairs(self) -> tuple[tuple[str, str], ...]:
        """The (user, Pin) embedding pairs whose cosine the model reads (empty unless ``similarity``)."""
        if not self.similarity:
            return ()
        sources = dict.fromkeys(DERM_NAME.match(f)["source"] for f in self.features)
        return tuple((f"{s}_user", f"{s}_pin") for s in sources if {f"{s}_user", f"{s}_pin"} <= set(self.features))

    def store_name(self, feature: str) -> str:
        """``ctr_user`` → ``ctr-user``: the store folder or Redis namespace of an embedding."""
        m = DERM_NAME.match(feature)
        return f"{m['source']}-{m['entity']}"


@dataclass(frozen=True)
class DownstreamRunConfig:
    """The run config of a downstream model (TOML sections as :class:`RunConfig`,
    plus ``kind`` and ``[derm]``)."""

    kind: str = "ctr"
    """ctr: the MMoE of DCNv2 experts; cvr: the DHEN model (independent of ``data.source``)."""
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(run_dir="runs/demo/downstream/ctr"))
    model: DownstreamConfig = field(default_factory=DownstreamConfig)
    derm: DERMJoinConfig = field(default_factory=DERMJoinConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)

    def __post_init__(self) -> None:
        check_data_train(self.data, self.train)
        if self.kind not in DOWNSTREAM_KINDS:
            raise ValueError(f"kind must be one of {DOWNSTREAM_KINDS}, got {self.kind!r}")
        if self.model.derm or self.model.derm_similarity:
            raise ValueError("set the DERM embeddings with [derm] features and similarity (their widths come from the stores), "
                             "not model.derm or model.derm_similarity")


TASKS = {"upstream": RunConfig, "downstream": DownstreamRunConfig}
"""``trainer/main.py --task``: the config class of each task."""


def load_run_config(task: str, path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Any:
    """The run config of ``task`` (upstream or downstream) from ``path`` (or the defaults) and
    ``section.field=value`` overrides (:func:`common.config.load_config`)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    return load_config(path, list(overrides), TASKS[task])
