"""The planner's per-device rules and the plan dry-run: CPU plans use only layouts that run on
CPU, and a production-sized model plans on meta in seconds, fits 64 x 80 GB with its big tables
split, and is refused, with the numbers, on 8 x 16 GB."""

from __future__ import annotations

import dataclasses
import resource
import subprocess
import sys
import time

import pytest

from data.synthetic import PRESETS
from data.synthetic.features import synthetic_spec
from modules.embedding_tables import embedding_bag_configs, embedding_configs
from sharding.plan_cli import build_meta_model, dry_run, main, scale_entity_tables
from sharding.planner import LARGE_TABLE_ROWS, allowed_sharding_types, make_planner, sharders, sharding_constraints
from tests.helpers import TINY

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.jit._script")  # torch.distributed.optim, at first import

ROW_WISE = {"row_wise", "table_row_wise"}
PRODUCTION = ["--users", "500000000", "--pins", "100000000", "--dim", "128"]
BIG_TABLES = ("t_user_id", "t_pin_id", "t_seq_pin")


@pytest.fixture(scope="module")
def tiny_spec():
    return synthetic_spec(TINY).for_source("cvr")


@pytest.fixture(scope="module")
def production_spec():
    return scale_entity_tables(synthetic_spec(PRESETS["large"]), users=500_000_000, pins=100_000_000, dim=128)


def _rows(spec, table_name: str) -> int:
    return next(f.num_embeddings for f in (*spec.sparse, *spec.sequence) if f"t_{f.table}" == table_name)


def _kinds(spec) -> dict[str, str]:
    return {**{c.name: "ebc" for c in embedding_bag_configs(spec)}, **{c.name: "ec" for c in embedding_configs(spec)}}


# ---- constraints per device ------------------------------------------------------------------


@pytest.mark.parametrize("large_table_rows", [LARGE_TABLE_ROWS, 100])  # 100: the tiny id tables count as large
def test_cpu_constraints_keep_to_layouts_that_run_on_cpu(tiny_spec, large_table_rows):
    constraints = sharding_constraints(tiny_spec, "cpu", large_table_rows=large_table_rows)
    kinds = _kinds(tiny_spec)
    assert set(constraints) == set(kinds)  # every table, named t_<table>
    for name, c in constraints.items():
        types = set(c.sharding_types)
        if kinds[name] == "ebc":
            assert types and not types & ROW_WISE, name  # FBGEMM has no CPU row-wise bags
        else:
            assert types == {"table_wise", "row_wise"}, name  # EC data_parallel fails in forward on CPU
        if _rows(tiny_spec, name) >= large_table_rows:
            assert "data_parallel" not in types, name
        assert set(c.compute_kernels) <= {"fused", "dense"}
    if large_table_rows == 100:
        assert "data_parallel" not in constraints["t_user_id"].sharding_types
        assert "data_parallel" in constraints["t_user_gender"].sharding_types


def test_cuda_constraints_split_large_tables_by_rows(production_spec):
    constraints = sharding_constraints(production_spec.for_source("ctr"), "cuda")
    for name in ("t_user_id", "t_pin_id"):
        assert set(constraints[name].sharding_types) == ROW_WISE
    assert constraints["t_seq_pin"].sharding_types == ["row_wise"]
    assert "data_parallel" in constraints["t_user_gender"].sharding_types
    assert not ROW_WISE & set(constraints["t_user_gender"].sharding_types)  # small tables stay whole
    assert "fused_uvm" not in constraints["t_user_id"].compute_kernels
    uvm = sharding_constraints(production_spec.for_source("ctr"), "cuda", allow_uvm=True)
    assert {"fused_uvm", "fused_uvm_caching"} <= set(uvm["t_user_id"].compute_kernels)


def test_column_wise_only_where_it_splits_a_table():
    # TorchRec's column shards are >= 128 wide: a narrower table would be one shard.
    assert "column_wise" not in allowed_sharding_types("ebc", "cpu", 1_000, 128)
    assert {"column_wise", "table_column_wise"} <= set(allowed_sharding_types("ebc", "cpu", 1_000, 256))


def test_one_host_plans_row_wise_not_its_twin_table_row_wise():
    run = dry_run(synthetic_spec(PRESETS["large"]), "ctr", world_size=8, device_type="cuda", local_world_size=8)
    types = {t.name: t.sharding_type for t in run.tables}
    assert types["t_user_id"] == types["t_pin_id"] == "row_wise"


def test_constraints_from_spec_module_and_configs_agree(tiny_spec):
    by_spec = sharding_constraints(tiny_spec, "cpu", large_table_rows=100)
    by_module = sharding_constraints(build_meta_model(tiny_spec, "cvr"), "cpu", large_table_rows=100)
    by_configs = sharding_constraints([*embedding_bag_configs(tiny_spec), *embedding_configs(tiny_spec)], "cpu", large_table_rows=100)
    for other in (by_module, by_configs):
        assert {k: v.sharding_types for k, v in other.items()} == {k: v.sharding_types for k, v in by_spec.items()}
    # Only the spec knows how long sequences are: the planner sizes their lookups from it.
    assert by_spec["t_seq_pin"].pooling_factors == [float(TINY.seq_len), float(TINY.conv_seq_len)]


def test_bad_arguments_are_refused(tiny_spec):
    with pytest.raises(ValueError, match="device type"):
        sharding_constraints(tiny_spec, "tpu")
    with pytest.raises(ValueError, match="allow_uvm"):
        sharding_constraints(tiny_spec, "cpu", allow_uvm=True)
    with pytest.raises(ValueError, match="hbm_gb"):
        make_planner(2, "cpu", hbm_gb=16)
    with pytest.raises(ValueError, match="world_size"):
        make_planner(0, "cuda")


# ---- plans -----------------------------------------------------------------------------------


def test_cpu_plan_of_the_tiny_spec_uses_only_allowed_layouts(tiny_spec):
    constraints = sharding_constraints(tiny_spec, "cpu")
    plan = make_planner(2, "cpu", constraints=constraints).plan(build_meta_model(tiny_spec, "cvr"), sharders())
    placed = {table: p.sharding_type for tables in plan.plan.values() for table, p in tables.items()}
    assert set(placed) == set(constraints)
    for table, sharding_type in placed.items():
        assert sharding_type in constraints[table].sharding_types, table


def test_the_dry_run_model_lives_on_meta(production_spec):
    model = build_meta_model(production_spec, "ctr")
    assert {p.device.type for p in model.parameters()} == {"meta"}


@pytest.mark.slow
def test_production_plan_fits_64_gpus_with_big_tables_split(production_spec):
    run = dry_run(production_spec, "ctr", world_size=64, device_type="cuda", hbm_gb=80, local_world_size=8)
    assert run.fits, run.error
    tables = {t.name: t for t in run.tables}
    for name in BIG_TABLES:
        assert tables[name].sharding_type in ROW_WISE, name
        assert len(set(tables[name].ranks)) > 1, name
        assert tables[name].compute_kernel == "fused"  # in HBM
    for r in run.ranks:
        assert r.total.hbm <= r.capacity.hbm and r.tables.ddr == 0
    # The estimate counts every table: at least the fp32 weights (500M + 2 x 100M rows x 128).
    assert sum(r.tables.hbm for r in run.ranks) >= 700_000_000 * 128 * 4


@pytest.mark.slow
def test_cli_production_plan_on_meta_in_seconds(tmp_path):
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "sharding.plan_cli", *PRODUCTION, "--world-size", "64", "--device", "cuda", "--hbm-gb", "80"],
        capture_output=True, text=True, timeout=120,
    )
    seconds = time.perf_counter() - start
    assert out.returncode == 0, out.stdout + out.stderr
    assert "FITS" in out.stdout and "t_user_id" in out.stdout and "Per rank" in out.stdout
    assert seconds < 60
    # Meta tensors only: the tables would be ~340 GB; the planner process stays small.
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert peak_kib < 4 * 1024**2, f"dry run peaked at {peak_kib / 1024**2:.1f} GiB"


def test_cli_refuses_a_cluster_too_small_with_the_numbers(capsys):
    code = main([*PRODUCTION, "--world-size", "8", "--device", "cuda", "--hbm-gb", "16"])
    out = capsys.readouterr().out
    assert code == 1
    assert "DOES NOT FIT" in out and "HBM: the tables need at least" in out and "--allow-uvm" in out


def test_cli_runs_as_python_m_sharding_plan_on_cpu(capsys):
    from sharding.__main__ import main as sharding_main

    assert sharding_main(["plan", "--synthetic-preset", "tiny", "--source", "cvr", "--world-size", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "FITS" in out and "HBM" not in out.split("Tables")[1]  # a CPU plan shows DDR only


def test_cli_bad_arguments_exit_2(capsys):
    assert main(["--world-size", "2", "--device", "cpu", "--hbm-gb", "16"]) == 2
    assert main(["--world-size", "2", "--device", "cpu", "--source", "nope"]) == 2
    assert "error:" in capsys.readouterr().err


def test_scale_entity_tables_resizes_only_entity_tables():
    base = synthetic_spec(TINY)
    big = scale_entity_tables(base, users=1000, pins=500, dim=32)
    sizes = {f.table: (f.num_embeddings, f.embedding_dim) for f in (*big.sparse, *big.sequence)}
    assert sizes["user_id"] == (1000, 32) and sizes["pin_id"] == (500, 32) and sizes["seq_pin"] == (500, 32)
    assert sizes["campaign_id"] == (TINY.n_campaigns, 16)
    no_users = dataclasses.replace(base, sparse=tuple(f for f in base.sparse if f.name != "user_id"))
    with pytest.raises(ValueError, match="user key"):
        scale_entity_tables(no_users, users=10)
