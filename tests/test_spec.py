"""Feature spec: loading, round trips, TorchRec table configs, and every refusal names its key."""

from __future__ import annotations

import textwrap

import pytest
from torchrec.modules.embedding_configs import PoolingType

from data.spec import FeatureSpec, SpecError, load_spec, spec_from_dict
from modules.embedding_tables import embedding_bag_configs, embedding_configs

GOOD = textwrap.dedent(
    """
    name = "example"

    [keys]
    user = "uid"

    [[sources]]
    name = "ctr"
    labels = ["click", "good_click"]
    oracle = { click = "p_click" }

    [[sources]]
    name = "cvr"
    labels = ["conversion"]

    [[sparse]]
    name = "user_id"
    column = "uid"
    tower = "user"
    num_embeddings = 100
    embedding_dim = 16

    [[sparse]]
    name = "user_interests"
    tower = "user"
    num_embeddings = 10
    embedding_dim = 8
    multi = true
    pooling = "mean"

    [[sparse]]
    name = "pin_id"
    tower = "pin"
    num_embeddings = 50
    embedding_dim = 16

    [[sparse]]
    name = "related_pin"
    tower = "pin"
    num_embeddings = 50
    embedding_dim = 16
    table = "pin_id"

    [[sequence]]
    name = "user_seq"
    column = "seq_pin_ids"
    tower = "user"
    num_embeddings = 50
    embedding_dim = 16
    max_length = 4
    side = [{ name = "action", column = "seq_action", kind = "id", num_embeddings = 4 },
            { name = "age", column = "seq_age", kind = "value", transform = "log1p" }]

    [[dense]]
    name = "user_pretrained"
    tower = "user"
    width = 3

    [[dense]]
    name = "conv_count"
    tower = "user"
    transform = "log1p"
    sources = ["cvr"]
    """
)


def _raw(text: str = GOOD) -> dict:
    import tomllib

    return tomllib.loads(text)


def test_good_spec_loads_with_defaults(tmp_path):
    path = tmp_path / "spec.toml"
    path.write_text(GOOD)
    spec = load_spec(path)
    assert spec.keys.user == "uid" and spec.keys.pin == "pin_id"  # unset keys keep their defaults
    assert [s.name for s in spec.sources] == ["ctr", "cvr"]
    assert spec.source("ctr").oracle == {"click": "p_click"}
    pin = spec.sparse[2]
    assert (pin.column, pin.table, pin.pooling, pin.multi) == ("pin_id", "pin_id", "sum", False)
    assert spec.sequence[0].side[1].transform == "log1p"
    assert [f.name for f in spec.features("pin")] == ["pin_id", "related_pin"]


def test_round_trip_through_toml(tmp_path):
    spec = spec_from_dict(_raw())
    spec.dump(tmp_path / "out" / "spec.toml")
    assert load_spec(tmp_path / "out" / "spec.toml") == spec
    assert not list((tmp_path / "out").glob(".spec-*"))  # no temporary left behind


def test_for_source_keeps_only_its_features():
    spec = spec_from_dict(_raw())
    assert "conv_count" not in [f.name for f in spec.for_source("ctr").dense]
    assert "conv_count" in [f.name for f in spec.for_source("cvr").dense]
    assert spec.for_source("cvr").source_names == ["cvr"]


def test_torchrec_configs_group_shared_tables():
    spec = spec_from_dict(_raw())
    bags = {c.name: c for c in embedding_bag_configs(spec)}
    assert list(bags) == ["t_user_id", "t_user_interests", "t_pin_id"]
    assert bags["t_pin_id"].feature_names == ["pin_id", "related_pin"]
    assert bags["t_user_interests"].pooling == PoolingType.MEAN
    assert (bags["t_user_id"].num_embeddings, bags["t_user_id"].embedding_dim) == (100, 16)
    assert [c.name for c in embedding_bag_configs(spec, towers=["pin"])] == ["t_pin_id"]
    (seq,) = embedding_configs(spec)
    assert (seq.name, seq.feature_names, seq.num_embeddings) == ("t_user_seq", ["user_seq"], 50)


def _edit(old: str, new: str) -> dict:
    assert old in GOOD, old
    return _raw(GOOD.replace(old, new, 1))


@pytest.mark.parametrize(
    "old, new, message",
    [
        ('name = "example"', 'name = "example"\ncolour = "red"', "unknown key(s) ['colour']"),
        ('pooling = "mean"', 'pooling = "max"', "sparse[1] (user_interests).pooling must be one of"),
        ('embedding_dim = 8', 'embedding_dim = 6', "sparse[1] (user_interests).embedding_dim must be a positive multiple of 4"),
        ('num_embeddings = 100', 'num_embeddings = 0', "sparse[0] (user_id).num_embeddings must be >= 1"),
        ('num_embeddings = 100', 'num_embeddings = "100"', "sparse[0].num_embeddings must be an integer"),
        ('name = "user_id"\ncolumn = "uid"\ntower = "user"', 'name = "user_id"\ncolumn = "uid"\ntower = "item"', "sparse[0] (user_id).tower must be one of"),
        ('max_length = 4', 'max_length = 0', "sequence[0] (user_seq).max_length must be >= 1"),
        ('kind = "id", num_embeddings = 4', 'kind = "id"', "side[0] (action).num_embeddings must be >= 1"),
        ('kind = "value"', 'kind = "text"', "side[1] (age).kind must be one of"),
        ('width = 3', 'width = 0', "dense[0] (user_pretrained).width must be >= 1"),
        ('sources = ["cvr"]', 'sources = ["search"]', "dense[1] (conv_count).sources names 'search'"),
        ('oracle = { click = "p_click" }', 'oracle = { purchase = "p" }', "oracle names 'purchase'"),
        ('labels = ["conversion"]', 'labels = []', "labels must name at least one label column"),
        ('name = "pin_id"\ntower = "pin"', 'name = "user_id"\ntower = "pin"', "sparse[2] (user_id).name is already taken"),
        ('table = "pin_id"', 'table = "pin_id"\npooling = "sum"\nmulti = 1', "multi must be true or false"),
        ('column = "seq_pin_ids"', 'column = "seq_pin_ids"\ntable = "pin_id"', "is already a sparse table"),
    ],
)
def test_bad_specs_are_refused_naming_the_key(old, new, message):
    with pytest.raises(SpecError) as e:
        spec_from_dict(_edit(old, new))
    assert message in str(e.value)


def test_shared_table_shapes_must_agree():
    raw = _edit('embedding_dim = 16\ntable = "pin_id"', 'embedding_dim = 32\ntable = "pin_id"')
    with pytest.raises(SpecError, match="shared with 'pin_id' but their num_embeddings/embedding_dim differ"):
        spec_from_dict(raw)


def test_shared_bag_tables_must_pool_alike():
    raw = _edit('table = "pin_id"', 'table = "pin_id"\npooling = "mean"')
    with pytest.raises(SpecError, match="shared with 'pin_id' but their pooling differs"):
        spec_from_dict(raw)


def test_missing_sources_and_missing_keys():
    with pytest.raises(SpecError, match="missing required key 'sources'"):
        spec_from_dict({"name": "x"})
    with pytest.raises(SpecError, match=r"sparse\[0\]: missing required key 'embedding_dim'"):
        spec_from_dict({"name": "x", "sources": [{"name": "ctr", "labels": ["click"]}],
                        "sparse": [{"name": "a", "tower": "user", "num_embeddings": 3}]})


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(SpecError, match="feature spec not found"):
        load_spec(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [")
    with pytest.raises(SpecError, match=f"{bad}: not valid TOML"):
        load_spec(bad)
    bad.write_text(GOOD.replace('max_length = 4', 'max_length = -1'))
    with pytest.raises(SpecError, match=f"{bad}: sequence\\[0\\]"):
        load_spec(bad)


def test_python_construction_defaults_column_and_table():
    from data.spec import Keys, Source, SparseFeature

    f = SparseFeature("country", "user", 20, 8)
    assert (f.column, f.table) == ("country", "country")
    spec = FeatureSpec("s", Keys(), (Source("ctr", ("click",)),), sparse=(f,))
    assert spec.to_dict()["sparse"] == [
        {"name": "country", "tower": "user", "num_embeddings": 20, "embedding_dim": 8, "multi": False, "pooling": "sum"}
    ]
