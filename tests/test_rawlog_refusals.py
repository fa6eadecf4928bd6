"""Issue 29: what a raw log must not get past data/rawlog.py silently — labels that are not 0/1,
keys that parsing would merge, seconds read as milliseconds, fractional ISO times, a folder of
parts, a full disk and a killed conversion's scratch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.rawlog import main

REPO = Path(__file__).resolve().parents[1]
T0 = 1_767_225_600  # 2026-01-01 00:00:00 UTC


def convert(tmp_path: Path, path: Path, *extra: str, out: str = "out") -> int:
    return main(["--input", str(path), "--out", str(tmp_path / out), "--user", "user", "--item", "item", "--time", "ts",
                 "--labels", "click", *extra])


def ids(root: Path, entity: str) -> dict[str, int]:
    t = pq.read_table(root / "ids" / f"{entity}.parquet")
    return dict(zip(t["raw"].to_pylist(), t["id"].to_pylist()))


@pytest.mark.parametrize("value, shown", [("0.9", "0.9"), ("1.5", "1.5"), ("yes", "'yes'"), ("", "None")])
def test_a_label_that_is_not_0_or_1_is_refused_never_truncated(tmp_path, capsys, value, shown):
    path = tmp_path / "log.csv"
    path.write_text(f"user,item,ts,click\na,x,{T0},1\nb,y,{T0 + 5},0\nc,z,{T0 + 9},{value}\n")
    assert convert(tmp_path, path) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"log.csv row 3: column 'click' (label 'click') must be 0 or 1; it has {shown}" in err
    assert not (tmp_path / "out").exists()


def test_label_columns_may_be_booleans_floats_of_0_and_1_or_the_texts_0_and_1(tmp_path):
    for i, (col, kind) in enumerate([([True, False, True], pa.bool_()), ([1.0, 0.0, 1.0], pa.float64()),
                                     (["1", "0", "1"], pa.string())]):
        path = tmp_path / f"log{i}.parquet"
        pq.write_table(pa.table({"user": ["a", "b", "a"], "item": ["x", "y", "z"], "ts": [T0, T0 + 1, T0 + 2],
                                 "click": pa.array(col, kind)}), path)
        assert convert(tmp_path, path, out=f"out{i}") == 0
        assert pq.read_table(tmp_path / f"out{i}" / "ctr")["click"].to_pylist() == [1, 0, 1]


def test_keys_are_text_never_merged_by_number_parsing(tmp_path):
    big = [str(2**64 + i) for i in range(10)]  # > 19 digits: CSV inference made them float64, all one user
    rows = [f"{u},x{i},{T0 + i},1" for i, u in enumerate(big)] + [f"007,a,{T0 + 20},0", f"7,a,{T0 + 21},1", f"07,b,{T0 + 22},0"]
    path = tmp_path / "log.csv"
    path.write_text("user,item,ts,click\n" + "\n".join(rows) + "\n")
    assert convert(tmp_path, path) == 0
    users = ids(tmp_path / "out", "user")
    assert len(users) == 13 and set(big) | {"007", "7", "07"} == set(users)


def test_a_key_that_is_not_utf8_or_a_float_key_is_one_line_naming_file_column_and_row(tmp_path, capsys):
    path = tmp_path / "log.csv"
    path.write_bytes(b"user,item,ts,click\na,x,%d,1\n\xff\xfe,y,%d,0\n" % (T0, T0 + 1))
    assert convert(tmp_path, path) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "log.csv row 2: column 'user' holds a key that is not UTF-8 text" in err
    path = tmp_path / "log.jsonl"  # a JSON number beyond 64 bits is a float64: refused, not rounded
    path.write_text("".join(json.dumps({"user": 2**64 + i, "item": "x", "ts": T0 + i, "click": 1}) + "\n" for i in range(3)))
    assert convert(tmp_path, path) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "column 'user' holds keys as floating-point numbers" in err and "write them as strings" in err


def test_seconds_read_as_milliseconds_are_refused_with_the_time_unit_hint(tmp_path, capsys):
    path = tmp_path / "log.csv"
    path.write_text("user,item,ts,click\n" + "".join(f"u{i},x,{T0 + 3600 * i},1\n" for i in range(30)))
    assert convert(tmp_path, path, "--time-unit", "ms") == 2
    err = capsys.readouterr().err
    assert "every time falls in 1970 (1970-01-21" in err and "seconds read as milliseconds? check --time-unit" in err
    assert not (tmp_path / "out").exists()


def test_iso_times_with_fractional_seconds_are_read_and_floored(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("user,item,ts,click\na,x,2026-01-01T00:00:00.123Z,1\nb,y,2026-01-01T23:59:59.999Z,0\n"
                    "c,z,2026-01-02T00:00:00.5+00:00,1\n")
    assert convert(tmp_path, path, "--time-unit", "iso") == 0
    t = pq.read_table(tmp_path / "out" / "ctr").sort_by("event_time")["event_time"].to_pylist()
    assert t == [T0, T0 + 86_399, T0 + 86_400]


def test_a_folder_or_a_glob_of_parts_is_one_log(tmp_path):
    parts = tmp_path / "export"
    (parts / "day=1").mkdir(parents=True)
    (parts / "day=2").mkdir()
    (parts / "day=1" / "part-0.csv").write_text(f"user,item,ts,click\na,x,{T0},1\nb,y,{T0 + 1},0\n")
    (parts / "day=2" / "part-0.csv").write_text(f"user,item,ts,click\na,y,{T0 + 86_400},1\n")
    (parts / "_SUCCESS").write_text("")
    (parts / "day=1" / ".part-0.csv.crc").write_text("not data")
    assert convert(tmp_path, parts, out="from-folder") == 0
    assert convert(tmp_path, Path(f"{parts}/day=*/part-*.csv"), out="from-glob") == 0
    for out in ("from-folder", "from-glob"):
        assert pq.read_table(tmp_path / out / "ctr").num_rows == 3
        assert sorted(p.name for p in (tmp_path / out / "ctr").iterdir()) == ["day=2026-01-01", "day=2026-01-02"]
    (tmp_path / "empty").mkdir()
    assert convert(tmp_path, tmp_path / "empty", out="none") == 2


def test_a_full_disk_is_one_line_naming_the_path_and_leaves_nothing(tmp_path, small_disk):
    path = tmp_path / "log.csv"
    with open(path, "w") as f:  # ~10 MB of Parquet-hostile random keys: more than the 5 MiB disk holds
        f.write("user,item,ts,click\n")
        for i in range(200_000):
            f.write(f"user-{os.urandom(8).hex()},item-{os.urandom(8).hex()},{T0 + i % 80_000},{i % 2}\n")
    done = subprocess.run([sys.executable, "-m", "data.rawlog", "--input", str(path), "--out", str(small_disk / "out"),
                           "--user", "user", "--item", "item", "--time", "ts", "--labels", "click"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    err = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert "Traceback" not in done.stderr and len(err) == 1
    assert err[0].startswith(f"error: disk full: no space left on the device ({small_disk}/")
    assert sorted(p.name for p in small_disk.iterdir()) == []  # no scratch, no staging, no output


def test_a_killed_conversions_scratch_and_staging_are_removed_by_the_next_one(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text(f"user,item,ts,click\na,x,{T0},1\nb,y,{T0 + 1},0\n")
    # a conversion killed after claiming its scratch and its staging (what kill -9 mid-run leaves)
    code = ("import os, signal, tempfile; from common.files import claim; "
            f"s = tempfile.mkdtemp(prefix='.rawlog-', dir={str(tmp_path)!r}); a = claim(s); "
            f"t = tempfile.mkdtemp(prefix='.out.staging-', dir={str(tmp_path)!r}); b = claim(t); "
            "open(os.path.join(s, 'chunk.parquet'), 'wb').write(b'x' * 1000); os.kill(os.getpid(), signal.SIGKILL)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO)
    assert done.returncode == -signal.SIGKILL
    assert len(list(tmp_path.glob(".rawlog-*"))) == 1 and len(list(tmp_path.glob(".out.staging-*"))) == 1
    assert convert(tmp_path, path) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.csv", "out"]


def test_a_day_with_too_few_items_for_the_negatives_names_the_day_and_the_users_key(tmp_path, capsys):
    path = tmp_path / "log.csv"  # the first (partial) day has seen one item only
    path.write_text(f"user,item,ts,click\nvisitor-42,x,{T0},1\nvisitor-42,y,{T0 + 86_400},1\nvisitor-7,z,{T0 + 86_401},1\n")
    assert convert(tmp_path, path, "--negatives", "2") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "(day 2026-01-01): user visitor-42 has only 0 items to draw from" in err[0]
    assert "lower --negatives (or convert without the days with fewer items)" in err[0]
