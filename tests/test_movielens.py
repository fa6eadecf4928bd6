"""MovieLens-100K adapter (data/movielens/): the real data against its known counts and the
input contract, plus a hand-made atomic-file folder for exact values and bad input.

The module fixture downloads the RecBole 1.2.1 wheel once into <repo>/.cache/recbole (PyPI) and
converts it once; the whole file runs in about 20 s on two cores.
"""

from __future__ import annotations

import io
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from data import movielens
from data.movielens import MovieLensError, convert, fetch_recbole_wheel
from data.movielens.cli import main
from data.spec import load_spec

NEG = 4
L = 50


@pytest.fixture(scope="module")
def wheel() -> Path:
    return fetch_recbole_wheel(movielens.DEFAULT_CACHE)


@pytest.fixture(scope="module")
def ml100k(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ml") / "ml-100k"
    return out, convert(out, wheel=wheel, negatives=NEG, max_seq_len=L, seed=0)


@pytest.fixture(scope="module")
def ratings(wheel: Path) -> dict[str, np.ndarray]:
    """The raw ratings, parsed here independently of the adapter."""
    with zipfile.ZipFile(wheel) as z:
        data = z.read("recbole/dataset_example/ml-100k/ml-100k.inter")
    t = pacsv.read_csv(io.BytesIO(data), parse_options=pacsv.ParseOptions(delimiter="\t"))
    cols = ["user", "item", "rating", "time"]
    return {c: t.column(i).to_numpy().astype(np.int64) for i, c in enumerate(cols)}


@pytest.fixture(scope="module")
def ctr(ml100k: tuple[Path, dict]) -> pa.Table:
    return pq.read_table(ml100k[0] / "ctr", partitioning="hive")


def read_all(root: Path, source: str) -> pa.Table:
    return pq.read_table(root / source, partitioning="hive")


# ---- the real data --------------------------------------------------------------------------------


@pytest.mark.slow
def test_known_counts(ml100k, ratings, ctr):
    _, s = ml100k
    assert (s["ratings"], s["users"], s["items"]) == (100_000, 943, 1_682)
    assert len(np.unique(ratings["user"])) == 943 and len(np.unique(ratings["item"])) == 1_682
    assert (s["clicks"], s["conversions"]) == (55_375, 21_201)
    assert s["rows"] == {"ctr": 100_000 * (1 + NEG), "cvr": 100_000 * (1 + NEG)}
    assert s["days"] == 213 and (s["first_day"], s["last_day"]) == ("1997-09-20", "1998-04-22")
    rating = ctr["rating"].to_numpy()
    assert len(ctr) == 500_000 and (rating > 0).sum() == 100_000
    assert ctr["click"].to_numpy().sum() == 55_375
    assert np.array_equal(ctr["click"].to_numpy(), (rating >= 4).astype(np.int8))


def test_cvr_carries_the_same_impressions(ml100k, ctr):
    cvr = read_all(ml100k[0], "cvr")
    assert "click" not in cvr.column_names and "conversion" not in ctr.column_names
    assert cvr.drop_columns(["conversion"]).equals(ctr.drop_columns(["click"]))
    rating = cvr["rating"].to_numpy()
    assert np.array_equal(cvr["conversion"].to_numpy(), (rating == 5).astype(np.int8))
    assert cvr["conversion"].to_numpy().sum() == 21_201


def test_days_and_time_order(ml100k, ctr):
    root = ml100k[0]
    for source in ("ctr", "cvr"):
        days = sorted(p.name for p in (root / source).iterdir())
        assert len(days) == 213 and all((root / source / d / "part-00000.parquet").exists() for d in days)
    t = ctr["event_time"].to_numpy()
    utc_day = (t // 86_400).astype("datetime64[D]").astype(str)
    assert np.array_equal(utc_day, ctr["day"].to_numpy(zero_copy_only=False).astype(str))
    assert np.all(np.diff(t) >= 0)  # days read in order, rows in time order within each
    hour = ctr["hour_of_day"].to_numpy()
    assert np.array_equal(hour, (t % 86_400) // 3600)
    assert ctr["day_of_week"].to_numpy()[0] == 5  # 1997-09-20 was a Saturday (Monday = 0)


def test_spec_names_existing_columns_with_sensible_types(ml100k, ctr):
    spec = load_spec(ml100k[0] / "spec.toml")
    assert spec.source_names == ["ctr", "cvr"]
    assert spec.source("ctr").labels == ("click",) and spec.source("cvr").labels == ("conversion",)
    schema = ctr.schema
    is_int_list = lambda ty: pa.types.is_list(ty) and pa.types.is_integer(ty.value_type)  # noqa: E731
    for key in (spec.keys.user, spec.keys.pin, spec.keys.time):
        assert schema.field(key).type == pa.int64()
    assert schema.field("click").type == pa.int8() and schema.field("rating").type == pa.int8()
    names = {f.name for f in spec.features()}
    assert "rating" not in names and "click" not in names  # analysis column and label, not features
    for f in spec.sparse:
        ty = schema.field(f.column).type
        assert is_int_list(ty) if f.multi else pa.types.is_integer(ty), f.name
        ids = pc.list_flatten(ctr[f.column]) if f.multi else ctr[f.column]
        lo, hi = pc.min_max(ids).values()
        assert 0 <= lo.as_py() and hi.as_py() < f.num_embeddings, f.name
    (seq,) = spec.sequence
    assert (seq.column, seq.max_length, seq.tower) == ("seq_pin_ids", L, "user")
    assert schema.field(seq.column).type == pa.list_(pa.int64())
    assert pc.max(pc.list_flatten(ctr[seq.column])).as_py() < seq.num_embeddings
    side = {s.name: s for s in seq.side}
    assert schema.field(side["seq_rating"].column).type == pa.list_(pa.int32())
    assert schema.field(side["seq_age_days"].column).type == pa.list_(pa.float32())
    stars = pc.min_max(pc.list_flatten(ctr["seq_rating"]))
    assert (stars["min"].as_py(), stars["max"].as_py()) == (1, 5) and side["seq_rating"].num_embeddings == 6
    for f in spec.dense:
        assert schema.field(f.column).type == pa.float32() and f.transform == "log1p", f.name


def _pair_times(ratings: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    key = ratings["user"] * 10_000 + ratings["item"]  # ML-100K: one rating per (user, item)
    order = np.argsort(key)
    return key[order], ratings["time"][order], ratings["rating"][order]


@pytest.mark.slow
def test_sequences_hold_strictly_earlier_ratings_newest_first(ctr, ratings):
    keys, times, stars = _pair_times(ratings)
    user, t = ctr["user_id"].to_numpy(), ctr["event_time"].to_numpy()
    seq = ctr["seq_pin_ids"].combine_chunks()
    parent = pc.list_parent_indices(seq).to_numpy()
    item = pc.list_flatten(seq).to_numpy()
    q = user[parent] * 10_000 + item
    pos = np.minimum(np.searchsorted(keys, q), len(keys) - 1)
    assert np.array_equal(keys[pos], q)  # every element is a movie that user rated
    seq_t = times[pos]
    assert np.all(seq_t < t[parent])  # strictly earlier: no same-second ratings (label leak)
    same_row = parent[1:] == parent[:-1]
    assert np.all(seq_t[1:][same_row] <= seq_t[:-1][same_row])  # newest first
    assert np.array_equal(pc.list_flatten(ctr["seq_rating"]).to_numpy(), stars[pos])
    age = pc.list_flatten(ctr["seq_age_days"]).to_numpy()
    np.testing.assert_allclose(age, (t[parent] - seq_t) / 86_400, rtol=1e-6)

    # Length = min(#strictly-earlier ratings of the user, L); the dense count is that number.
    ukey = np.sort(ratings["user"] * 10**10 + ratings["time"])
    earlier = np.searchsorted(ukey, user * 10**10 + t) - np.searchsorted(ukey, user * 10**10)
    lengths = pc.list_value_length(seq).to_numpy()
    assert np.array_equal(lengths, np.minimum(earlier, L)) and lengths.max() == L
    assert np.array_equal(ctr["user_num_prior_ratings"].to_numpy(), earlier.astype(np.float32))

    # A few rows against a plain reference: the newest L earlier ratings (ties: later in the file first).
    rng = np.random.default_rng(1)
    for r in rng.choice(len(ctr), 200, replace=False):
        mine = np.flatnonzero((ratings["user"] == user[r]) & (ratings["time"] < t[r]))
        newest = mine[np.lexsort((mine, ratings["time"][mine]))[::-1][:L]]
        assert seq[int(r)].as_py() == ratings["item"][newest].tolist()


def test_pin_prior_counts(ctr, ratings):
    pin, t = ctr["pin_id"].to_numpy(), ctr["event_time"].to_numpy()
    got = ctr["pin_num_prior_ratings"].to_numpy()
    for r in np.random.default_rng(2).choice(len(ctr), 200, replace=False):
        assert got[r] == np.count_nonzero((ratings["item"] == pin[r]) & (ratings["time"] < t[r]))


def test_negatives_are_unrated_and_share_the_positives_context(ctr, ratings):
    keys, _, _ = _pair_times(ratings)
    neg = ctr.filter(pc.equal(ctr["rating"], 0))
    assert len(neg) == NEG * 100_000
    q = neg["user_id"].to_numpy() * 10_000 + neg["pin_id"].to_numpy()
    pos = np.minimum(np.searchsorted(keys, q), len(keys) - 1)
    assert not np.any(keys[pos] == q)  # never rated by that user, at any time
    assert neg["click"].to_numpy().sum() == 0
    # Each (user, second) holds its ratings and K negatives for each; user side constant per user.
    g = ctr.group_by(["user_id", "event_time"]).aggregate([("rating", "count"), ("click", "count")])
    per = ctr.filter(pc.greater(ctr["rating"], 0)).group_by(["user_id", "event_time"]).aggregate([("rating", "count")])
    assert sorted(g["rating_count"].to_pylist()) == sorted((per["rating_count"].to_numpy() * (1 + NEG)).tolist())
    for col in ("user_age_bucket", "user_gender", "user_occupation", "user_zip3"):
        d = ctr.group_by("user_id").aggregate([(col, "count_distinct")])
        assert pc.max(d[f"{col}_count_distinct"]).as_py() == 1, col
    for col in ("pin_release_year",):
        d = ctr.group_by("pin_id").aggregate([(col, "count_distinct")])
        assert pc.max(d[f"{col}_count_distinct"]).as_py() == 1, col


@pytest.mark.slow
def test_same_seed_same_files(ml100k, wheel, tmp_path):
    root, first = ml100k
    again = convert(tmp_path / "again", wheel=wheel, negatives=NEG, max_seq_len=L, seed=0)
    assert {k: v for k, v in again.items() if k not in ("out", "seconds")} == \
        {k: v for k, v in first.items() if k not in ("out", "seconds")}
    for source in ("ctr", "cvr"):
        assert read_all(tmp_path / "again", source).equals(read_all(root, source)), source
    assert (tmp_path / "again" / "spec.toml").read_text() == (root / "spec.toml").read_text()


# ---- a hand-made atomic-file folder -------------------------------------------------------------

T0 = 880_000_000  # 1997-11-20 04:26:40 UTC
INTER = [  # user, item, rating, time
    (1, 10, 5, T0), (1, 20, 3, T0), (1, 30, 4, T0 + 10), (1, 40, 1, T0 + 86_400),
    (2, 10, 4, T0 + 5), (2, 50, 2, T0 + 5),
    (3, 20, 5, T0 + 20), (3, 60, 4, T0 + 30),
]
USERS = [(1, 24, "M", "technician", "85711"), (2, 53, "F", "other", "T8H1N"), (3, 17, "M", "student", "05201")]
ITEMS = [(10, "A", "1995", "Comedy"), (20, "B", "unkonwn", "Drama Comedy"), (30, "C", "1931", "Drama"),
         (40, "D", "1998", "Horror"), (50, "E", "1977", "Sci-Fi War"), (60, "F", "1960", "unknown")]


def write_folder(path: Path, inter=INTER, users=USERS, items=ITEMS,
                 inter_header="user_id:token\titem_id:token\trating:float\ttimestamp:float") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    rows = lambda header, rs: "\n".join([header, *("\t".join(map(str, r)) for r in rs)]) + "\n"  # noqa: E731
    (path / "tiny.inter").write_text(rows(inter_header, inter))
    user_header = "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token"
    item_header = "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"
    (path / "tiny.user").write_text(rows(user_header, users))
    (path / "tiny.item").write_text(rows(item_header, items))
    return path


def test_folder_source_exact_values(tmp_path):
    s = convert(tmp_path / "out", source_dir=write_folder(tmp_path / "src"), negatives=1, max_seq_len=2, seed=3)
    assert (s["ratings"], s["users"], s["items"], s["days"]) == (8, 3, 6, 2)
    assert (s["clicks"], s["conversions"], s["rows"]["ctr"]) == (5, 2, 16)
    t = read_all(tmp_path / "out", "ctr")
    pos = t.filter(pc.greater(t["rating"], 0)).to_pylist()
    by = {(r["user_id"], r["pin_id"]): r for r in pos}
    assert by[1, 10]["seq_pin_ids"] == [] and by[1, 20]["seq_pin_ids"] == []  # same second: no leak
    assert by[1, 30]["seq_pin_ids"] == [20, 10] and by[1, 30]["seq_rating"] == [3, 5]  # ties: later in file first
    assert by[1, 40]["seq_pin_ids"] == [30, 20]  # truncated to max_seq_len, newest first
    assert by[1, 40]["user_num_prior_ratings"] == 3.0
    np.testing.assert_allclose(by[1, 40]["seq_age_days"], [1 - 10 / 86_400, 1.0], rtol=1e-6)
    assert by[3, 20]["pin_num_prior_ratings"] == 1.0 and by[2, 10]["pin_num_prior_ratings"] == 1.0
    assert by[1, 10]["pin_num_prior_ratings"] == 0.0
    # Buckets: age 17 -> 0, 24 -> 1, 53 -> 5; zip "T8H1N" is hashed past the 1000 numeric prefixes.
    assert [by[u, i]["user_age_bucket"] for u, i in ((3, 20), (1, 10), (2, 10))] == [0, 1, 5]
    assert [by[u, i]["user_zip3"] for u, i in ((1, 10), (3, 20))] == [857, 52] and by[2, 10]["user_zip3"] >= 1000
    assert by[3, 20]["pin_release_year"] == 0 and by[1, 30]["pin_release_year"] == 1  # unknown; before 1940
    assert by[1, 40]["pin_release_year"] == len(movielens.features.YEAR_EDGES) + 1
    # Genres vocabulary: Comedy Drama Horror Sci-Fi War unknown.
    assert by[1, 20]["pin_genres"] == [1, 0] and by[3, 60]["pin_genres"] == [5]
    rated = {(u, i) for u, i, _, _ in INTER}
    assert all((r["user_id"], r["pin_id"]) not in rated for r in t.filter(pc.equal(t["rating"], 0)).to_pylist())
    spec = load_spec(tmp_path / "out" / "spec.toml")
    assert {f.name: f.num_embeddings for f in spec.sparse}["pin_genres"] == 6


@pytest.mark.parametrize(
    "change, file, column, words",
    [
        (dict(inter_header="user_id:token\titem_id:token\tstars:float\ttimestamp:float"), "tiny.inter", "rating",
         "missing column"),
        (dict(inter=[*INTER, (2, 30, 7, T0)]), "tiny.inter", "rating", "1..5"),
        (dict(inter=[*INTER, ("u2", 30, 4, T0)]), "tiny.inter", "user_id", "not a non-negative integer"),
        (dict(items=[*ITEMS, ("x9", "G", "1990", "Drama")]), "tiny.item", "item_id", "not a non-negative integer"),
        (dict(inter=[*INTER, (9, 30, 4, T0)]), "tiny.inter", "user_id", "not in"),
        (dict(users=[*USERS, USERS[0]]), "tiny.user", "user_id", "more than once"),
    ],
)
def test_bad_input_names_file_column_and_problem(tmp_path, change, file, column, words):
    src = write_folder(tmp_path / "src", **change)
    out = tmp_path / "out"
    with pytest.raises(MovieLensError) as e:
        convert(out, source_dir=src, negatives=1)
    assert file in str(e.value) and column in str(e.value) and words in str(e.value), str(e.value)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["src"]  # nothing partial left


def test_refuses_to_overwrite_without_overwrite(tmp_path):
    src, out = write_folder(tmp_path / "src"), tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        convert(out, source_dir=src, negatives=1)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    convert(out, source_dir=src, negatives=1, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["ctr", "cvr", "spec.toml"]


def test_too_many_negatives_is_refused(tmp_path):
    with pytest.raises(MovieLensError, match="lower --negatives"):
        convert(tmp_path / "out", source_dir=write_folder(tmp_path / "src"), negatives=5)


def test_cli(tmp_path, capsys):
    src, out = write_folder(tmp_path / "src"), tmp_path / "out"
    assert main(["--out", str(out), "--source-dir", str(src), "--negatives", "1", "--seed", "7"]) == 0
    assert (out / "spec.toml").exists()
    capsys.readouterr()
    assert main(["--out", str(out), "--source-dir", str(src), "--negatives", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("derm-movielens: error:") and "--overwrite" in err and err.count("\n") == 1
    bad = write_folder(tmp_path / "bad", inter=[*INTER, (2, 30, 0, T0)])
    assert main(["--out", str(tmp_path / "o2"), "--source-dir", str(bad)]) == 2
    assert "tiny.inter: column 'rating'" in capsys.readouterr().err


def test_fetch_failure_is_a_clear_error(tmp_path, monkeypatch):
    def failing(cmd, **kw):
        assert cmd[1:4] == ["-m", "pip", "download"]
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for recbole==1.2.1\n")

    monkeypatch.setattr(movielens.source.subprocess, "run", failing)
    with pytest.raises(MovieLensError, match="could not download recbole==1.2.1 with pip"):
        fetch_recbole_wheel(tmp_path)
