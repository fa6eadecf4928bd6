"""Streaming loader: batch contents on a hand-built example, exact-once partitioning across ranks
and workers, resuming, TorchRec consumption, and every refusal of bad input."""

from __future__ import annotations

import collections
import dataclasses
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingCollection

from data.columns import hash_ids
from data.dataset_writer import write_part
from data.loader import BatchLoader, DataError, EventLog, make_loader, shard_range
from data.spec import DenseFeature, FeatureSpec, Keys, SequenceFeature, SideList, Source, SparseFeature
from modules.embedding_tables import embedding_bag_configs, embedding_configs

SPEC = FeatureSpec(
    name="hand-built",
    keys=Keys(),
    sources=(Source("ctr", labels=("click", "good_click"), oracle={"click": "p_click"}),),
    sparse=(
        SparseFeature("user_id", "user", 100, 4),
        SparseFeature("user_interests", "user", 5, 4, multi=True, pooling="mean"),
        SparseFeature("pin_id", "pin", 10, 4),
    ),
    sequence=(
        SequenceFeature(
            "user_seq", "user", 10, 4, max_length=2, column="seq_pin_ids",
            side=(SideList("action", "seq_action", "id", num_embeddings=4),
                  SideList("age", "seq_age", "value", transform="log1p")),
        ),
    ),
    dense=(DenseFeature("user_ctr", "user", transform="log1p"), DenseFeature("pin_vec", "pin", width=2)),
)


DAY0 = 1_767_225_600  # 2026-01-01 00:00:00 UTC


def _rows(**changes) -> pa.Table:
    cols = {
        "user_id": pa.array([1, 2, 99], pa.int64()),
        "pin_id": pa.array([3, 7, 12345], pa.int64()),
        "event_time": pa.array([DAY0 + 100, DAY0 + 200, DAY0 + 300], pa.int64()),
        "user_interests": pa.array([[0, 2], [], [4]], pa.list_(pa.int64())),
        "seq_pin_ids": pa.array([[5, 6, 7], [], [9]], pa.list_(pa.int64())),
        "seq_action": pa.array([[1, 2, 1], [], [3]], pa.list_(pa.int32())),
        "seq_age": pa.array([[0.5, 1.0, 2.0], [], [3.0]], pa.list_(pa.float32())),
        "user_ctr": pa.array([0.0, math.e - 1, 3.0], pa.float32()),
        "pin_vec": pa.FixedSizeListArray.from_arrays(pa.array([1, 2, 3, 4, 5, 6], pa.float32()), 2),
        "click": pa.array([1, 0, 1], pa.int8()),
        "good_click": pa.array([0, 0, 1], pa.int8()),
        "p_click": pa.array([0.9, 0.1, 0.5], pa.float32()),
    }
    for k, v in changes.items():
        if v is None:
            cols.pop(k)
        else:
            cols[k] = v
    return pa.table(cols)


def _dataset(tmp_path, table=None, day="2026-01-01") -> "pathlib.Path":  # noqa: F821
    root = tmp_path / "data"
    SPEC.dump(root / "spec.toml")
    write_part(_rows() if table is None else table, root, "ctr", day, 0)
    return root


def test_batches_match_a_hand_built_example(tmp_path):
    root = _dataset(tmp_path)
    first, second = list(make_loader(root, "ctr", batch_size=2))

    assert first.sparse.keys() == ["user_id", "user_interests", "pin_id"]
    assert first.sparse.values().tolist() == [1, 2, 0, 2, 3, 7]
    assert first.sparse.lengths().tolist() == [1, 1, 2, 0, 1, 1]
    # Sequences keep the newest max_length=2 items; side lists are padded to [B, 2].
    assert first.sequence.keys() == ["user_seq"]
    assert first.sequence.values().tolist() == [5, 6]
    assert first.sequence.lengths().tolist() == [2, 0]
    assert first.sequence_side["user_seq"]["action"].tolist() == [[1, 2], [0, 0]]
    assert first.sequence_side["user_seq"]["action"].dtype == torch.int64
    torch.testing.assert_close(first.sequence_side["user_seq"]["age"], torch.tensor([[np.log1p(0.5), np.log1p(1.0)], [0, 0]], dtype=torch.float32))
    torch.testing.assert_close(first.dense["user_ctr"], torch.tensor([[0.0], [1.0]]))
    torch.testing.assert_close(first.dense["pin_vec"], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert first.labels.tolist() == [[1.0, 0.0], [0.0, 0.0]]
    assert first.oracle[:, 0].tolist() == pytest.approx([0.9, 0.1]) and torch.isnan(first.oracle[:, 1]).all()
    assert first.user_id.tolist() == [1, 2] and first.event_time.tolist() == [DAY0 + 100, DAY0 + 200]

    # The last, partial batch; Pin 12345 lies outside its 10-row table and is hashed into it,
    # while the raw key stays available for publishing.
    assert second.batch_size == 1
    assert second.sparse.values().tolist() == [99, 4, int(hash_ids(np.array([12345]), 10)[0])]
    assert second.pin_id.tolist() == [12345]
    assert second.sequence_side["user_seq"]["action"].tolist() == [[3, 0]]


def test_hash_ids_keeps_in_range_ids_and_spreads_the_rest():
    ids = np.array([0, 5, 9, 10, 11, 2**40, 2**62])
    out = hash_ids(ids, 10)
    assert out[:3].tolist() == [0, 5, 9]
    assert out.tolist() == [0, 5, 9, 6, 3, 1, 5]  # golden: splitmix64 mod 10 (checked in pure Python)
    spread = np.bincount(hash_ids(np.arange(1000, 101_000), 100), minlength=100)
    assert spread.min() > 850 and spread.max() < 1150


@pytest.mark.parametrize("world_size, num_workers", [(1, 0), (2, 0), (3, 0), (2, 2)])
def test_ranks_and_workers_cover_every_row_exactly_once(tiny_world, world_size, num_workers):
    def rows(batches):
        return collections.Counter(
            zip(*(torch.cat([getattr(b, k) for b in batches]).tolist() for k in ("user_id", "pin_id", "event_time")))
        )

    everything = rows(list(make_loader(tiny_world, "ctr", batch_size=4096)))
    seen = collections.Counter()
    sizes = []
    for rank in range(world_size):
        loader = make_loader(tiny_world, "ctr", batch_size=700, rank=rank, world_size=world_size, num_workers=num_workers)
        batches = list(loader)
        assert len(batches) == len(loader)
        sizes.append(sum(b.batch_size for b in batches))
        seen += rows(batches)
    assert seen == everything and sum(everything.values()) == 12_000
    assert max(sizes) - min(sizes) <= 1


def test_shard_range_is_balanced_and_contiguous():
    ranges = [shard_range(10, s, 4) for s in range(4)]
    assert ranges == [(0, 2), (2, 5), (5, 7), (7, 10)]
    with pytest.raises(ValueError):
        shard_range(10, 4, 4)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_after_the_last_batch(tiny_world, num_workers):
    def loader():
        return make_loader(tiny_world, "cvr", batch_size=300, rank=1, world_size=2, num_workers=num_workers)

    full = [b.user_id for b in loader()]
    first = loader()
    head = []
    for b in first:
        head.append(b.user_id)
        if len(head) == 5:
            break
    state = first.state_dict()
    assert state["position"] == 5
    resumed = loader()
    resumed.load_state_dict(state)
    tail = [b.user_id for b in resumed]
    assert torch.equal(torch.cat(head + tail), torch.cat(full))
    assert resumed.state_dict()["position"] == 0 and resumed.passes == 1


def test_resume_refuses_another_layout(tiny_world):
    state = make_loader(tiny_world, "ctr", batch_size=300).state_dict()
    other = make_loader(tiny_world, "ctr", batch_size=500)
    with pytest.raises(DataError, match="layout changed.*batch_size"):
        other.load_state_dict(state)


def test_batches_feed_torchrec_collections(tiny_world):
    loader = make_loader(tiny_world, "cvr", batch_size=64)
    spec = loader.dataset.events.reader.spec
    batch = next(iter(loader))
    pooled = EmbeddingBagCollection(tables=embedding_bag_configs(spec), device=torch.device("cpu"))(batch.sparse).to_dict()
    assert pooled["user_interests"].shape == (64, 8) and pooled["pin_id"].shape == (64, 16)
    seqs = EmbeddingCollection(tables=embedding_configs(spec), device=torch.device("cpu"))(batch.sequence)
    for f in spec.sequence:
        padded = seqs[f.name].to_padded_dense(desired_length=f.max_length)  # [B, L, D]
        assert padded.shape == (64, f.max_length, f.embedding_dim)
        for side in batch.sequence_side[f.name].values():
            assert side.shape == (64, f.max_length)
    assert batch.to(torch.device("cpu")).labels.shape == (64, 3)


# ---- bad input ---------------------------------------------------------------------------------


def _error(tmp_path, table) -> str:
    root = _dataset(tmp_path, table)
    with pytest.raises(DataError) as e:
        list(make_loader(root, "ctr", batch_size=2))
    assert str(root / "ctr" / "day=2026-01-01" / "part-00000.parquet") in str(e.value)
    return str(e.value)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"pin_id": None}, "missing column 'pin_id' (Pin key)"),
        ({"user_id": pa.array(["a", "b", "c"])}, "column 'user_id' (user key) has type string; expected integer ids"),
        ({"pin_id": pa.array([3.0, 7.5, 1.0])}, "column 'pin_id' (Pin key) has type double; expected integer ids"),
        ({"user_id": pa.array([1, 2, None], pa.int64())}, "column 'user_id' (user key) is null at row 2"),
        ({"pin_id": pa.array([3, -7, 1], pa.int64())}, "column 'pin_id' (Pin key) has a negative id at row 1"),
        ({"user_interests": pa.array([[0], [1, -2], []], pa.list_(pa.int64()))}, "'user_interests' (sparse feature 'user_interests') has a negative id at row 1"),
        ({"click": pa.array([1, 0, 2], pa.int8())}, "column 'click' (label 'click') must be 0 or 1; row 2 has 2"),
        ({"user_ctr": pa.array([0.0, float("nan"), 1.0], pa.float32())}, "'user_ctr' (dense feature 'user_ctr') has NaN or infinite values"),
        ({"user_ctr": pa.array([0.0, -2.0, 1.0], pa.float32())}, "has negative values; log1p needs >= 0"),
        ({"seq_action": pa.array([[1, 2], [], [3]], pa.list_(pa.int32()))}, "'seq_action' (side list 'action') must be as long as 'seq_pin_ids' in every row; row 0 is not"),
        ({"seq_action": pa.array([[1, 2, 9], [], [3]], pa.list_(pa.int32()))}, "has id 9, outside [0, 4)"),
        ({"pin_vec": pa.array([[1.0, 2.0], [3.0], [5.0, 6.0]], pa.list_(pa.float32()))}, "must hold 2 values per row; row 1 does not"),
        ({"seq_pin_ids": pa.array([[5, 6, 7], None, [9]], pa.list_(pa.int64()))}, "'seq_pin_ids' (sequence feature 'user_seq') is null at row 1"),
    ],
)
def test_bad_rows_are_refused_naming_file_column_and_problem(tmp_path, changes, message):
    assert message in _error(tmp_path, _rows(**changes))


def test_bad_partitions_and_files(tmp_path):
    root = _dataset(tmp_path)
    with pytest.raises(DataError, match=r"day=2026-02-01: no such day partition; available days: 2026-01-01"):
        EventLog(root, "ctr", days=["2026-02-01"])
    two_sources = dataclasses.replace(SPEC, sources=(*SPEC.sources, Source("cvr", ("click",))))
    with pytest.raises(DataError, match="cvr: no such source directory"):
        EventLog(root, "cvr", spec=two_sources)
    (root / "ctr" / "day=2026-01-02").mkdir()
    with pytest.raises(DataError, match=r"day=2026-01-02: empty partition \(no .parquet files\)"):
        EventLog(root, "ctr")
    write_part(_rows().slice(0, 0), root, "ctr", "2026-01-02", 0)
    with pytest.raises(DataError, match=r"day=2026-01-02: empty partition \(its files hold no rows\)"):
        EventLog(root, "ctr")
    bad = root / "ctr" / "day=2026-01-02" / "part-00001.parquet"
    bad.write_bytes(b"definitely not parquet")
    with pytest.raises(DataError, match=f"{bad}: unreadable Parquet file"):
        EventLog(root, "ctr")
    assert EventLog(root, "ctr", days=["2026-01-01"]).num_rows == 3  # the good day still reads


def test_a_partition_cut_in_another_time_zone_is_refused(tmp_path):
    # 2026-01-01 in UTC-8: its evening is 2026-01-02 in UTC, where the DERM join would look
    late = _rows(event_time=pa.array([DAY0 + 8 * 3600, DAY0 + 20 * 3600, DAY0 + 31 * 3600], pa.int64()))
    root = _dataset(tmp_path, late)
    with pytest.raises(DataError, match=r"part-00000.parquet: event_time spans 2026-01-01 08:00:00 .. 2026-01-02 07:00:00 UTC, "
                                        r"outside its partition's day 2026-01-01 \(UTC\)"):
        EventLog(root, "ctr")
    millis = _rows(event_time=pa.array([(DAY0 + 1) * 1000] * 3, pa.int64()))  # milliseconds, not seconds
    with pytest.raises(DataError, match="fix the times' unit"):
        EventLog(_dataset(tmp_path / "ms", millis), "ctr")


def test_writer_leftovers_are_not_data_and_id_types_must_agree(tmp_path):
    root = _dataset(tmp_path)
    day = root / "ctr" / "day=2026-01-01"
    for name in (".part-00002.parquet", "_tmp-00001.parquet"):  # a Spark / Hadoop writer's leftovers
        pq.write_table(_rows(), day / name)
    (day / "_SUCCESS").write_text("")
    assert EventLog(root, "ctr").num_rows == 3
    write_part(_rows(user_id=pa.array([1, 2, 3], pa.int32())), root, "ctr", "2026-01-01", 1)
    with pytest.raises(DataError, match=r"part-00001.parquet: column 'user_id' has type int32, but .*part-00000.parquet has it as int64"):
        EventLog(root, "ctr")


def test_uint64_ids_beyond_int64_are_refused(tmp_path):
    message = _error(tmp_path, _rows(pin_id=pa.array([3, 2 ** 63 + 5, 1], pa.uint64())))
    assert "column 'pin_id' (Pin key) has an id >= 2^63 at row 1, beyond int64" in message


def test_corrupt_data_pages_are_reported_with_the_file(tmp_path):
    root = _dataset(tmp_path)
    path = root / "ctr" / "day=2026-01-01" / "part-00000.parquet"
    data = bytearray(path.read_bytes())
    meta_len = int.from_bytes(data[-8:-4], "little")
    for i in range(8, len(data) - meta_len - 8):  # scribble over the data pages, keep the footer
        data[i] = 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"{path}: unreadable Parquet data"):
        list(make_loader(root, "ctr", batch_size=2))


def test_bad_arguments(tmp_path):
    events = EventLog(_dataset(tmp_path), "ctr")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        BatchLoader(events, batch_size=0)
    with pytest.raises(ValueError, match=r"rank 2 outside \[0, world_size=2\)"):
        BatchLoader(events, batch_size=2, rank=2, world_size=2)
