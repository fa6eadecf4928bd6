"""Arrow columns -> the tensors of a :class:`~data.batch.Batch`, with the input contract
enforced on the way (DESIGN.md §Input contract: nothing silently dropped or guessed).

:class:`ColumnReader` is built once per source from the spec. It checks a file's schema from its
footer (:meth:`check_schema`), the values of every slice it reads (:meth:`check_values`: nulls,
negative ids, labels outside {0, 1}, non-finite dense values, side lists of the wrong length), and
converts checked rows to a batch (:meth:`to_batch`) with vectorised numpy, no loop over rows.
Every error is a :class:`DataError` that names the file, the column and the problem.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data.batch import Batch
from data.spec import FeatureSpec


class DataError(ValueError):
    """Input that breaks the contract; the message names the file, the column and the problem."""


@dataclass(frozen=True)
class _Need:
    """What one column must hold."""

    column: str
    kind: str  # "id" | "id_list" | "number" | "number_list" | "vector" | "label" | "probability"
    role: str  # what it is in the spec, for messages ("sparse feature 'user_id'")
    width: int = 1  # vectors: the fixed width


def hash_ids(ids: np.ndarray, num_embeddings: int) -> np.ndarray:
    """Maps non-negative int64 ids into ``[0, num_embeddings)``: in-range ids stay as they are,
    the rest are mixed with splitmix64 and taken modulo the table size (DESIGN.md: "ids outside
    the table are hashed into it")."""
    out = ids.astype(np.int64, copy=True)
    big = out >= num_embeddings
    if big.any():
        z = out[big].astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
        out[big] = (z % np.uint64(num_embeddings)).astype(np.int64)
    return out


class ColumnReader:
    """Reads one source's columns as its spec says; see the module docstring."""

    def __init__(self, spec: FeatureSpec, source: str) -> None:
        self.spec = spec.for_source(source)
        self.source = self.spec.source(source)
        k = self.spec.keys
        needs = [
            _Need(k.user, "id", "user key"),
            _Need(k.pin, "id", "Pin key"),
            _Need(k.time, "id", "event time"),
        ]
        for f in self.spec.sparse:
            needs.append(_Need(f.column, "id_list" if f.multi else "id", f"sparse feature '{f.name}'"))
        for f in self.spec.sequence:
            needs.append(_Need(f.column, "id_list", f"sequence feature '{f.name}'"))
            for s in f.side:
                kind = "id_list" if s.kind == "id" else "number_list"
                needs.append(_Need(s.column, kind, f"side list '{s.name}' of sequence '{f.name}'"))
        for f in self.spec.dense:
            needs.append(_Need(f.column, "vector" if f.width > 1 else "number", f"dense feature '{f.name}'", f.width))
        needs += [_Need(c, "label", f"label '{c}'") for c in self.source.labels]
        needs += [_Need(c, "probability", f"oracle of '{l}'") for l, c in self.source.oracle.items()]
        # A column may serve several roles (e.g. user_id as key and as feature): check it once.
        self.needs: dict[str, _Need] = {}
        for n in needs:
            self.needs.setdefault(n.column, n)

    @property
    def columns(self) -> list[str]:
        return list(self.needs)

    # ---- checks -----------------------------------------------------------------------------
    def check_schema(self, schema: pa.Schema, where: str) -> None:
        """Every needed column is present with a usable type (from the footer, before reading)."""
        missing = [c for c in self.needs if c not in schema.names]
        if missing:
            n = self.needs[missing[0]]
            raise DataError(f"{where}: missing column '{missing[0]}' ({n.role}); all missing: {missing}")
        for column, need in self.needs.items():
            t = schema.field(column).type
            ok = {
                "id": pa.types.is_integer(t),
                "label": pa.types.is_integer(t) or pa.types.is_boolean(t) or pa.types.is_floating(t),
                "probability": pa.types.is_floating(t),
                "number": _is_number(t),
                "id_list": _is_list(t) and pa.types.is_integer(t.value_type),
                "number_list": _is_list(t) and _is_number(t.value_type),
                "vector": _is_list(t)
                and _is_number(t.value_type)
                and (not pa.types.is_fixed_size_list(t) or t.list_size == need.width),
            }[need.kind]
            if not ok:
                want = {
                    "id": "integer ids (int8..int64)",
                    "label": "0/1 labels (integer, bool or float)",
                    "probability": "float probabilities",
                    "number": "numbers",
                    "id_list": "lists of integer ids",
                    "number_list": "lists of numbers",
                    "vector": f"fixed-size lists of {need.width} numbers",
                }[need.kind]
                raise DataError(f"{where}: column '{column}' ({need.role}) has type {t}; expected {want}")

    def check_values(self, data: pa.Table, where: str, first_row: int) -> None:
        """Value checks on rows ``first_row ...`` of a file; raises on the first violation."""
        for column, need in self.needs.items():
            arr = data.column(column)
            if arr.null_count:
                row = first_row + _first(pc.is_null(arr))
                raise DataError(f"{where}: column '{column}' ({need.role}) is null at row {row}; nulls are not allowed")
            if need.kind in ("id_list", "number_list", "vector"):
                flat = pc.list_flatten(arr)
                if flat.null_count:
                    raise DataError(f"{where}: column '{column}' ({need.role}) has a null list element")
            else:
                flat = arr
            if need.kind in ("id", "id_list") and flat.type == pa.uint64() and _max(flat) >= 2 ** 63:
                row = first_row + _first_row_where(arr, pc.greater_equal(flat, pa.scalar(2 ** 63, pa.uint64())))
                raise DataError(f"{where}: column '{column}' ({need.role}) has an id >= 2^63 at row {row}, beyond int64; "
                                "remap or hash the ids below 2^63")
            if need.kind in ("id", "id_list") and _min(flat) < 0:
                row = first_row + _first_row_where(arr, pc.less(flat, 0))
                raise DataError(f"{where}: column '{column}' ({need.role}) has a negative id at row {row}")
            if need.kind == "label":
                bad = pc.invert(pc.is_in(pc.cast(arr, pa.float64()), pa.array([0.0, 1.0])))
                if _any(bad):
                    row = first_row + _first(bad)
                    raise DataError(f"{where}: column '{column}' ({need.role}) must be 0 or 1; row {row} has {arr[_first(bad)]}")
            if need.kind in ("number", "number_list", "vector", "probability") and pa.types.is_floating(flat.type):
                finite = pc.is_finite(flat)
                if not _all(finite):
                    raise DataError(f"{where}: column '{column}' ({need.role}) has NaN or infinite values")
            if need.kind == "vector" and not pa.types.is_fixed_size_list(arr.type):
                lengths = pc.list_value_length(arr)
                if not _all(pc.equal(lengths, need.width)):
                    row = first_row + _first(pc.not_equal(lengths, need.width))
                    raise DataError(f"{where}: column '{column}' ({need.role}) must hold {need.width} values per row; row {row} does not")
        for f in self.spec.dense:
            values = data.column(f.column)
            if f.transform == "log1p" and _min(pc.list_flatten(values) if f.width > 1 else values) < 0:
                raise DataError(f"{where}: column '{f.column}' (dense feature '{f.name}') has negative values; log1p needs >= 0")
        for f in self.spec.sequence:
            seq_len = pc.list_value_length(data.column(f.column))
            for s in f.side:
                same = pc.equal(pc.list_value_length(data.column(s.column)), seq_len)
                if not _all(same):
                    row = first_row + _first(pc.invert(same))
                    raise DataError(
                        f"{where}: column '{s.column}' (side list '{s.name}') must be as long as '{f.column}' in every row; row {row} is not"
                    )
                if s.kind == "id":
                    top = pc.max(pc.list_flatten(data.column(s.column))).as_py()
                    if top is not None and top >= s.num_embeddings:
                        raise DataError(
                            f"{where}: column '{s.column}' (side list '{s.name}') has id {top}, outside [0, {s.num_embeddings})"
                        )

    # ---- conversion -------------------------------------------------------------------------
    def to_batch(self, data: pa.Table) -> Batch:
        """Converts checked rows to a batch (see :class:`Batch` for layouts)."""
        B = data.num_rows
        col = lambda name: data.column(name).combine_chunks()  # noqa: E731

        # Pooled sparse features: one KJT, feature-major.
        values, lengths = [], []
        for f in self.spec.sparse:
            arr = col(f.column)
            if f.multi:
                ids, lens = _flat(pc.list_flatten(arr)), _lengths(arr)
            else:
                ids, lens = _flat(arr), np.ones(B, np.int32)
            values.append(hash_ids(ids, f.num_embeddings))
            lengths.append(lens)
        sparse = _kjt([f.name for f in self.spec.sparse], values, lengths)

        # Sequences: truncate to the newest max_length items; side lists padded to [B, L].
        values, lengths, side = [], [], {}
        for f in self.spec.sequence:
            arr = col(f.column)
            full = _lengths(arr)
            kept = np.minimum(full, f.max_length)
            row = np.repeat(np.arange(B), kept)
            within = np.arange(kept.sum()) - np.repeat(np.cumsum(kept) - kept, kept)
            take = np.repeat(np.cumsum(full) - full, kept) + within  # index into the flattened list
            values.append(hash_ids(_flat(pc.list_flatten(arr))[take], f.num_embeddings))
            lengths.append(kept.astype(np.int32))
            side[f.name] = {}
            for s in f.side:
                flat = _flat(pc.list_flatten(col(s.column)))[take]
                dtype = np.int64 if s.kind == "id" else np.float32
                padded = np.zeros((B, f.max_length), dtype)
                padded[row, within] = _transform(flat.astype(dtype), s.transform)
                side[f.name][s.name] = torch.from_numpy(padded)
        sequence = _kjt([f.name for f in self.spec.sequence], values, lengths)

        dense = {}
        for f in self.spec.dense:
            arr = col(f.column)
            x = _flat(pc.list_flatten(arr)) if f.width > 1 else _flat(arr)
            dense[f.name] = torch.from_numpy(_transform(x.astype(np.float32), f.transform).reshape(B, f.width))

        labels = np.stack([_flat(col(c)).astype(np.float32) for c in self.source.labels], axis=1)
        oracle = None
        if self.source.oracle:
            oracle = np.full(labels.shape, np.nan, np.float32)
            for i, label in enumerate(self.source.labels):
                if label in self.source.oracle:
                    oracle[:, i] = _flat(col(self.source.oracle[label]))
        k = self.spec.keys
        return Batch(
            sparse=sparse,
            sequence=sequence,
            sequence_side=side,
            dense=dense,
            labels=torch.from_numpy(labels),
            oracle=None if oracle is None else torch.from_numpy(oracle),
            user_id=torch.from_numpy(_flat(col(k.user)).astype(np.int64)),
            pin_id=torch.from_numpy(_flat(col(k.pin)).astype(np.int64)),
            event_time=torch.from_numpy(_flat(col(k.time)).astype(np.int64)),
        )


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _all(mask: pa.Array | pa.ChunkedArray) -> bool:
    return bool(pc.all(mask, min_count=0).as_py())


def _any(mask: pa.Array | pa.ChunkedArray) -> bool:
    return bool(pc.any(mask, min_count=0).as_py())


def _min(values: pa.Array | pa.ChunkedArray) -> float:
    """Smallest value; +inf for no values."""
    m = pc.min(values).as_py()
    return float("inf") if m is None else m


def _max(values: pa.Array | pa.ChunkedArray) -> int | float:
    """Largest value; -inf for no values."""
    m = pc.max(values).as_py()
    return float("-inf") if m is None else m


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def _flat(arr: pa.Array) -> np.ndarray:
    return arr.to_numpy(zero_copy_only=False)


def _lengths(arr: pa.Array) -> np.ndarray:
    return pc.list_value_length(arr).to_numpy(zero_copy_only=False).astype(np.int64)


def _transform(x: np.ndarray, how: str) -> np.ndarray:
    return np.log1p(x) if how == "log1p" else x


def _kjt(keys: list[str], values: list[np.ndarray], lengths: list[np.ndarray]) -> KeyedJaggedTensor:
    if not keys:
        return KeyedJaggedTensor(keys=[], values=torch.empty(0, dtype=torch.int64), lengths=torch.empty(0, dtype=torch.int32))
    return KeyedJaggedTensor(
        keys=keys,
        values=torch.from_numpy(np.concatenate(values).astype(np.int64)),
        lengths=torch.from_numpy(np.concatenate(lengths).astype(np.int32)),
    )


def _first(mask: pa.Array | pa.ChunkedArray) -> int:
    """Index of the first true entry."""
    return int(np.flatnonzero(np.asarray(mask.to_numpy(zero_copy_only=False), bool))[0])


def _first_row_where(lists_or_values: pa.Array | pa.ChunkedArray, flat_mask: pa.Array) -> int:
    """Row of the first true entry of ``flat_mask`` (over flattened values for list columns)."""
    hit = _first(flat_mask)
    t = lists_or_values.type
    if not _is_list(t):
        return hit
    ends = np.cumsum(_lengths(lists_or_values.combine_chunks() if isinstance(lists_or_values, pa.ChunkedArray) else lists_or_values))
    return int(np.searchsorted(ends, hit, side="right"))
