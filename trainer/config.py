"""The run config: one TOML file per run plus ``--section.field=value`` overrides, read into typed,
frozen dataclasses, validated before any process group starts, unknown keys rejected.

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

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import tomli_w

from modules.config import DERMConfig
from modules.precision import MIXED_PRECISION_MODES
from sharding.dmp import OptimizerConfig
from trainer.data.synthetic.config import PRESETS


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
    (``trainer.distributed.set_threads``). On a shared machine, set the cores that are yours."""


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
    if t.log_every < 1 or t.max_steps_per_day < 0 or d.num_workers < 0:
        raise ValueError("train.log_every must be >= 1, train.max_steps_per_day and data.num_workers >= 0")


# ---- loading -----------------------------------------------------------------------------------


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = (), cls: type = RunConfig) -> Any:
    """The config of ``path`` (or the defaults) with ``section.field=value`` overrides applied, as
    ``cls`` (:class:`RunConfig`, or :class:`trainer.downstream.DownstreamRunConfig`).
    Values are TOML (``3``, ``0.1``, ``true``, ``["a", "b"]``); bare words are strings."""
    raw: dict[str, Any] = {}
    if path:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ValueError(f"{path}: config file not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML: {e}") from None
    for item in overrides:
        key, sep, value = item.lstrip("-").partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r}: expected --section.field=value")
        *parents, leaf = key.split(".")
        node = raw
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {p} is not a section")
        node[leaf] = _parse_value(value)
    where = str(path) if path else "config"
    return from_dict(cls, raw, where)


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word: a string


def from_dict(cls: type, raw: Mapping[str, Any], where: str) -> Any:
    """Builds dataclass ``cls`` from ``raw``, recursively, naming the key of any error."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where} must be a table, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}" if where != "config" else k) for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _convert(kind: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(kind):
        return from_dict(kind, value, where)
    origin = typing.get_origin(kind)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} must be a list, got {value!r}")
        args = typing.get_args(kind)
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(items) != len(value):
            raise ValueError(f"{where} must have {len(items)} items, got {value!r}")
        return tuple(_convert(t, v, f"{where}[{i}]") for i, (t, v) in enumerate(zip(items, value)))
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(kind):
            try:
                return _convert(option, value, where)
            except ValueError:
                continue
        raise ValueError(f"{where}: {value!r} fits none of {kind}")
    if kind is type(None):
        if value is not None:
            raise ValueError(f"{where} must be empty")
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind in (int, float, str, bool) and (type(value) is not kind):
        raise ValueError(f"{where} must be {'an' if kind is int else 'a'} {kind.__name__}, got {value!r}")
    return value


def to_dict(config: Any) -> dict[str, Any]:
    """The dataclass as plain TOML-ready values."""
    def clean(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: clean(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return clean(config)


def dump_config(config: Any, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(tomli_w.dumps(to_dict(config)))
    os.replace(tmp, path)
