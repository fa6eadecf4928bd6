"""The feature spec: a declarative description of the input contract (../shared/DESIGN.md, §Input
contract), read from a TOML file into typed, validated, immutable config objects.

A spec names every column a source's Parquet files carry and what it is::

    name = "synthetic-ads"

    [keys]                      # entity keys and event time (one per row, never null)
    user = "user_id"
    pin = "pin_id"
    time = "event_time"         # int64 seconds since the epoch
    day = "day"                 # the hive partition key: <source>/day=YYYY-MM-DD/*.parquet

    [[sources]]                 # one upstream model per source (paper §3.1: ctr and cvr)
    name = "ctr"
    labels = ["click", "good_click"]
    oracle = { click = "p_click" }   # optional: true probabilities (synthetic data only)

    [[sparse]]                  # ids pooled by an EmbeddingBagCollection
    name = "user_country"
    tower = "user"              # user | pin | interaction
    num_embeddings = 64         # ids >= num_embeddings are hashed into the table
    embedding_dim = 16
    multi = false               # true: a list of ids per row
    pooling = "sum"             # sum | mean

    [[sequence]]                # ordered id lists, newest first, looked up unpooled (EmbeddingCollection)
    name = "user_seq"
    column = "seq_pin_ids"
    tower = "user"
    num_embeddings = 5000
    embedding_dim = 16
    max_length = 32
    side = [{ name = "action", column = "seq_action", kind = "id", num_embeddings = 4 },
            { name = "age_days", column = "seq_age_days", kind = "value", transform = "log1p" }]

    [[dense]]                   # float scalars (width 1) or fixed-size vectors
    name = "user_pretrained"
    tower = "user"
    width = 16
    transform = "none"          # none | log1p

Every feature may name the ``sources`` that carry it (default: all). Unknown keys, missing keys and
bad values raise :class:`SpecError` naming the file, the entry and the fix.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import tomli_w

from common.config import from_dict
from common.files import write_text_atomic

TOWERS = ("user", "pin", "interaction")
POOLINGS = ("sum", "mean")
TRANSFORMS = ("none", "log1p")
SIDE_KINDS = ("id", "value")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SpecError(ValueError):
    """A feature spec that breaks the contract; the message names the entry and the key."""


@dataclass(frozen=True)
class Keys:
    """Columns that identify an event: the entities it involves and when it happened."""

    user: str = "user_id"
    """int64 user key: the entity the user tower embeds."""
    pin: str = "pin_id"
    """int64 Pin (ad) key: the entity the Pin tower embeds."""
    time: str = "event_time"
    """int64 event time in seconds since the epoch (UTC)."""
    day: str = "day"
    """Hive partition key of the day directories (``day=YYYY-MM-DD``)."""


@dataclass(frozen=True)
class Source:
    """One event log and the tasks an upstream model learns from it (paper Appendix B.1)."""

    name: str
    """Source name, also its directory under the data root (``ROOT/<name>/day=.../``)."""
    labels: tuple[str, ...]
    """0/1 label columns, one task each, in head order."""
    oracle: Mapping[str, str] = field(default_factory=dict)
    """Optional label -> column of the true probability (synthetic worlds only)."""


@dataclass(frozen=True)
class SparseFeature:
    """Categorical ids pooled by an ``EmbeddingBagCollection``."""

    name: str
    """Feature name: the KeyedJaggedTensor key; towers read pooled embeddings by it."""
    tower: str
    """Which tower consumes it: user, pin or interaction (context and interaction features)."""
    num_embeddings: int
    """Rows of the table; ids at or above it are hashed into it."""
    embedding_dim: int
    """Embedding width (a multiple of 4, as FBGEMM's kernels require)."""
    column: str = ""
    """Parquet column (default: ``name``); int64 for one id a row, list<int64> when ``multi``."""
    multi: bool = False
    """True when a row holds a list of ids (e.g. curated interests)."""
    pooling: str = "sum"
    """How a row's ids are pooled: sum or mean."""
    table: str = ""
    """Embedding table name (default: ``name``); features naming the same table share it."""
    sources: tuple[str, ...] = ()
    """Sources that carry the column (default: all)."""

    def __post_init__(self) -> None:
        _default_to_name(self, "column", "table")


@dataclass(frozen=True)
class SideList:
    """A list parallel to a sequence (same length per row): action type, age of the event."""

    name: str
    """Name the model reads it by."""
    column: str
    """Parquet list column."""
    kind: str
    """``id``: small categorical ids (list<int>); ``value``: numbers (list<float or int>)."""
    num_embeddings: int = 0
    """Vocabulary size of an ``id`` side list (ids must lie in [0, num_embeddings))."""
    transform: str = "none"
    """Normalisation of a ``value`` side list: none or log1p."""


@dataclass(frozen=True)
class SequenceFeature:
    """Ordered id lists, newest first, looked up unpooled by an ``EmbeddingCollection``."""

    name: str
    """Feature name: the KeyedJaggedTensor key of the sequence ids."""
    tower: str
    """Consuming tower (user for engagement and conversion sequences)."""
    num_embeddings: int
    """Rows of the table; ids at or above it are hashed into it."""
    embedding_dim: int
    """Embedding width (a multiple of 4)."""
    max_length: int
    """Longer sequences are truncated to their newest ``max_length`` items."""
    column: str = ""
    """Parquet list<int64> column (default: ``name``)."""
    table: str = ""
    """Embedding table name (default: ``name``)."""
    side: tuple[SideList, ...] = ()
    """Parallel side lists."""
    sources: tuple[str, ...] = ()
    """Sources that carry the column (default: all)."""

    def __post_init__(self) -> None:
        _default_to_name(self, "column", "table")


@dataclass(frozen=True)
class DenseFeature:
    """A float scalar (width 1) or fixed-size vector (counting features, pretrained embeddings)."""

    name: str
    """Feature name: the key of ``Batch.dense``."""
    tower: str
    """Consuming tower."""
    width: int = 1
    """1 for a scalar column; k for a fixed-size list of k floats."""
    column: str = ""
    """Parquet column (default: ``name``)."""
    transform: str = "none"
    """Normalisation applied by the loader: none or log1p (values must then be >= 0)."""
    sources: tuple[str, ...] = ()
    """Sources that carry the column (default: all)."""

    def __post_init__(self) -> None:
        _default_to_name(self, "column")


@dataclass(frozen=True)
class FeatureSpec:
    """The whole input contract: keys, sources with their labels, and every feature."""

    name: str
    keys: Keys
    sources: tuple[Source, ...]
    sparse: tuple[SparseFeature, ...] = ()
    sequence: tuple[SequenceFeature, ...] = ()
    dense: tuple[DenseFeature, ...] = ()

    def __post_init__(self) -> None:
        _validate(self)

    # ---- queries -----------------------------------------------------------------------------
    def source(self, name: str) -> Source:
        for s in self.sources:
            if s.name == name:
                return s
        raise SpecError(f"spec {self.name!r} has no source {name!r}; it has {self.source_names}")

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self.sources]

    def for_source(self, name: str) -> "FeatureSpec":
        """The spec restricted to one source: its features, and that source alone."""
        src = self.source(name)
        keep = lambda f: not f.sources or name in f.sources  # noqa: E731
        return dataclasses.replace(
            self,
            sources=(src,),
            sparse=tuple(f for f in self.sparse if keep(f)),
            sequence=tuple(f for f in self.sequence if keep(f)),
            dense=tuple(f for f in self.dense if keep(f)),
        )

    def features(self, tower: str | None = None) -> list[SparseFeature | SequenceFeature | DenseFeature]:
        every = [*self.sparse, *self.sequence, *self.dense]
        return [f for f in every if tower is None or f.tower == tower]

    # ---- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        def clean(obj: Any) -> Any:
            if dataclasses.is_dataclass(obj):
                return {k: clean(v) for k, v in dataclasses.asdict(obj).items() if v not in ("", (), {}) or k == "labels"}
            if isinstance(obj, (list, tuple)):
                return [clean(v) for v in obj]
            if isinstance(obj, Mapping):
                return {k: clean(v) for k, v in obj.items()}
            return obj

        out = {"name": self.name, "keys": clean(self.keys), "sources": [clean(s) for s in self.sources]}
        for kind in ("sparse", "sequence", "dense"):
            entries = []
            for f in getattr(self, kind):
                d = clean(f)
                # Defaults that equal the name are implied; keep the file short.
                for k in ("column", "table"):
                    if d.get(k) == f.name:
                        d.pop(k)
                entries.append(d)
            if entries:
                out[kind] = entries
        return out

    def dump(self, path: str | os.PathLike) -> None:
        """Writes the spec as TOML, atomically (a reader never sees half a file)."""
        write_text_atomic(path, tomli_w.dumps(self.to_dict()))


# ---- loading ---------------------------------------------------------------------------------


def load_spec(path: str | os.PathLike) -> FeatureSpec:
    """Reads and validates a TOML feature spec."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise SpecError(f"{path}: feature spec not found") from None
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: not valid TOML: {e}") from None
    try:
        return spec_from_dict(raw)
    except SpecError as e:
        raise SpecError(f"{path}: {e}") from None


def spec_from_dict(raw: Mapping[str, Any]) -> FeatureSpec:
    """Builds a :class:`FeatureSpec` from parsed TOML through the project's strict parser
    (``common.config.from_dict``): unknown keys, missing required keys and values of the wrong
    type are refused naming the key (``sparse[0].num_embeddings must be an integer``)."""
    if isinstance(raw, Mapping) and "keys" not in raw:
        raw = {**raw, "keys": {}}  # [keys] is optional in the file: the default column names
    try:
        return from_dict(FeatureSpec, raw, "")
    except SpecError:
        raise
    except ValueError as e:
        raise SpecError(str(e)) from None


# ---- validation ------------------------------------------------------------------------------


def _validate(spec: FeatureSpec) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise SpecError(msg)

    need(bool(spec.sources), "spec needs at least one [[sources]] entry")
    keys = dataclasses.astuple(spec.keys)
    need(len(set(keys)) == len(keys), f"keys: columns must be distinct, got {keys}")
    source_names = [s.name for s in spec.sources]
    _unique(source_names, "sources")
    for i, s in enumerate(spec.sources):
        where = f"sources[{i}] ({s.name})"
        need(_NAME.match(s.name) is not None, f"{where}.name must be an identifier")
        need(len(s.labels) > 0, f"{where}.labels must name at least one label column")
        _unique(s.labels, f"{where}.labels")
        for label in s.oracle:
            need(label in s.labels, f"{where}.oracle names {label!r}, which is not one of its labels {list(s.labels)}")

    names: list[str] = []
    table_owner: dict[str, tuple[str, SparseFeature | SequenceFeature]] = {}
    for kind in ("sparse", "sequence", "dense"):
        for i, f in enumerate(getattr(spec, kind)):
            where = f"{kind}[{i}] ({f.name})"
            need(f.name not in names, f"{where}.name is already taken; feature names must be unique across sparse, sequence and dense")
            names.append(f.name)
            need(_NAME.match(f.name) is not None, f"{where}.name must be an identifier (letters, digits, _)")
            need(f.tower in TOWERS, f"{where}.tower must be one of {TOWERS}, got {f.tower!r}")
            for s in f.sources:
                need(s in source_names, f"{where}.sources names {s!r}; the spec's sources are {source_names}")
            if kind == "dense":
                need(f.width >= 1, f"{where}.width must be >= 1, got {f.width}")
                need(f.transform in TRANSFORMS, f"{where}.transform must be one of {TRANSFORMS}, got {f.transform!r}")
                continue
            need(f.num_embeddings >= 1, f"{where}.num_embeddings must be >= 1, got {f.num_embeddings}")
            need(
                f.embedding_dim >= 4 and f.embedding_dim % 4 == 0,
                f"{where}.embedding_dim must be a positive multiple of 4 (FBGEMM kernels), got {f.embedding_dim}",
            )
            if kind == "sparse":
                need(f.pooling in POOLINGS, f"{where}.pooling must be one of {POOLINGS}, got {f.pooling!r}")
            else:
                need(f.max_length >= 1, f"{where}.max_length must be >= 1, got {f.max_length}")
                _unique([s.name for s in f.side], f"{where}.side names")
                for j, s in enumerate(f.side):
                    sw = f"{where}.side[{j}] ({s.name})"
                    need(s.kind in SIDE_KINDS, f"{sw}.kind must be one of {SIDE_KINDS}, got {s.kind!r}")
                    if s.kind == "id":
                        need(s.num_embeddings >= 1, f"{sw}.num_embeddings must be >= 1 for an id side list")
                    need(s.transform in TRANSFORMS, f"{sw}.transform must be one of {TRANSFORMS}, got {s.transform!r}")
            # Features that share a table must agree on its shape (and, for bags, its kind).
            if f.table in table_owner:
                other_kind, other = table_owner[f.table]
                need(other_kind == kind, f"{where}.table {f.table!r} is already a {other_kind} table ({other.name})")
                need(
                    (other.num_embeddings, other.embedding_dim) == (f.num_embeddings, f.embedding_dim),
                    f"{where}.table {f.table!r} is shared with {other.name!r} but their num_embeddings/embedding_dim differ",
                )
                need(
                    kind != "sparse" or other.pooling == f.pooling,
                    f"{where}.table {f.table!r} is shared with {other.name!r} but their pooling differs (one table pools one way)",
                )
            else:
                table_owner[f.table] = (kind, f)


def _default_to_name(obj: object, *attrs: str) -> None:
    for attr in attrs:
        if not getattr(obj, attr):
            object.__setattr__(obj, attr, obj.name)  # frozen dataclass: set once, at construction


def _unique(values: Iterable[str], what: str) -> None:
    seen: set[str] = set()
    dup = sorted({v for v in values if v in seen or seen.add(v)})
    if dup:
        raise SpecError(f"{what} must be unique; repeated: {dup}")
