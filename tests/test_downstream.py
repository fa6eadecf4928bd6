"""Downstream CTR (MMoE of DCNv2 experts) and CVR (DHEN) models on real batches of the tiny world,
with 0, 2 and 4 DERM embeddings: shapes, gates, gradients, missing entities, restricted features,
meta builds and FX tracing."""

from __future__ import annotations

import pytest
import torch
import torchrec.fx

from modules.config import DHENConfig, SequenceConfig
from modules.downstream import DERMProjection, DownstreamOutput, build_downstream
from modules.downstream_config import DERMFeature, DownstreamConfig, missing_key
from modules.moe import MixtureOfDCNExperts
from tests.helpers import random_batch, tiny_spec

KEYS = {"ctr_user": 24, "ctr_pin": 24, "cvr_user": 16, "cvr_pin": 16}


SIMILARITY = (("ctr_user", "ctr_pin"), ("cvr_user", "cvr_pin"))


def _config(n_derm: int, projection: int = 8, **kw) -> DownstreamConfig:
    derm = tuple(DERMFeature(k, d, projection) for k, d in list(KEYS.items())[:n_derm])
    small = dict(
        token_dim=16,
        sequence=SequenceConfig(num_heads=2),
        num_experts=3,
        cross_layers=2,
        low_rank=4,
        expert_hidden=(32,),
        tower_hidden=(16,),
        dhen=DHENConfig(layers=(("transformer", "mlp"), ("dcn", "masknet")), out_tokens=2, mlp_hidden=32, masknet_block_dim=16, dcn_low_rank=4),
    )
    return DownstreamConfig(derm=derm, **{**small, **kw})


def _batch(source="ctr", size=64):
    """A random batch that fits the tiny world's spec (``tests.helpers.random_batch``)."""
    return random_batch(tiny_spec(), source, size)


def _derm(config: DownstreamConfig, batch_size: int, missing_rows=(1, 5)) -> dict[str, torch.Tensor]:
    """Random DERM embeddings; ``missing_rows`` have zeros and indicator 1 in every embedding."""
    g = torch.Generator().manual_seed(1)
    out = {}
    for f in config.derm:
        emb = torch.randn(batch_size, f.dim, generator=g)
        missing = torch.zeros(batch_size, 1)
        missing[list(missing_rows)] = 1.0
        out[f.name] = emb * (1 - missing)
        out[missing_key(f.name)] = missing
    return out


@pytest.mark.parametrize("kind", ["ctr", "cvr"])
@pytest.mark.parametrize("n_derm", [0, 2, 4])
@pytest.mark.parametrize("projection", [0, 8])
def test_shapes_and_gates(kind, n_derm, projection):
    torch.manual_seed(0)
    spec = tiny_spec()
    config = _config(n_derm, projection)
    task = build_downstream(spec, "ctr", config, kind=kind, device=torch.device("cpu"))
    batch = _batch()
    loss, (parts, out) = task(batch, _derm(config, 64))
    T = len(spec.source("ctr").labels)
    assert isinstance(out, DownstreamOutput) and out.logits.shape == (64, T)
    assert torch.isfinite(loss) and set(parts) == {"loss", *(f"bce/{t}" for t in range(T))}
    if kind == "ctr":
        assert out.gates.shape == (64, T, config.num_experts)
        torch.testing.assert_close(out.gates.sum(dim=-1), torch.ones(64, T))
        # Projected: P_k each; unprojected: the embedding and its indicator, E_k + 1.
        width = n_derm * projection if projection else sum(d + 1 for d in list(KEYS.values())[:n_derm])
        assert (task.model.derm.output_dim() if n_derm else 0) == width
    else:
        assert out.gates is None


@pytest.mark.parametrize(
    "kind, source, projection, extra",
    [("ctr", "ctr", 8, {}), ("ctr", "ctr", 0, {"cross_mixture": 2, "gate_hidden": (8,)}), ("cvr", "cvr", 8, {}), ("cvr", "ctr", 16, {}),
     ("ctr", "ctr", 8, {"derm_similarity": SIMILARITY, "low_rank": 0}), ("cvr", "cvr", 8, {"derm_similarity": SIMILARITY})],
)
def test_gradients_reach_every_parameter(kind, source, projection, extra):
    torch.manual_seed(0)
    spec = tiny_spec()
    config = _config(4, projection, **extra)
    task = build_downstream(spec, source, config, kind=kind, device=torch.device("cpu"))
    batch = _batch(source, 128)
    loss, _ = task(batch, _derm(config, 128))
    loss.backward()
    dead = [n for n, p in task.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not dead, f"no gradient reached {dead}"


@pytest.mark.parametrize("kind", ["ctr", "cvr"])
def test_missing_entity_is_finite_and_its_indicator_learns(kind):
    torch.manual_seed(0)
    spec = tiny_spec()
    config = _config(2, 8)
    task = build_downstream(spec, "ctr", config, kind=kind, device=torch.device("cpu"))
    batch = _batch()
    derm = _derm(config, 64, missing_rows=range(64))  # every entity missing: zeros + indicator 1
    assert all(torch.all(derm[f.name] == 0) for f in config.derm)
    loss, (_, out) = task(batch, derm)
    assert torch.isfinite(out.logits).all()
    loss.backward()
    projection = task.model.derm if kind == "ctr" else task.model.derm.projection
    for f in config.derm:
        weight = projection.proj[f.name].weight  # [P_k, E_k + 1]; the last column reads the indicator
        assert torch.any(weight.grad[:, -1] != 0), f"the indicator of {f.name} got no gradient"
        assert torch.all(weight.grad[:, :-1] == 0)  # zeros in, so the embedding columns learn nothing


def test_derm_features_are_required_when_configured():
    spec = tiny_spec()
    task = build_downstream(spec, "ctr", _config(2), device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"reads DERM embeddings \['ctr_user', 'ctr_pin'\]"):
        task(_batch(size=8))


@pytest.mark.parametrize("kind", ["ctr", "cvr"])
def test_restricted_feature_set(kind):
    spec = tiny_spec()
    allowed = ("user_id", "pin_id", "surface", "user_seq", "user_ctr_smoothed")
    config = _config(2, features=allowed)
    task = build_downstream(spec, "ctr", config, kind=kind, device=torch.device("cpu"))
    model = task.model
    tables = {n for c in model.ebc.embedding_bag_configs() for n in c.feature_names}
    assert tables == {"user_id", "pin_id", "surface"}
    assert {n for c in model.ec.embedding_configs() for n in c.feature_names} == {"user_seq"}
    others = [f.name for f in spec.for_source("ctr").features() if f.name not in allowed]
    names = [n for n, _ in model.named_modules()] + list(model.state_dict())
    assert not [n for n in names for o in others if o in n], "modules exist for features outside the allowed set"
    if kind == "ctr":
        assert model.input_dim == 16 + 16 + 4 + 1 + config.token_dim + 2 * 8
    else:
        assert sum(ft.num_tokens for ft in model.inputs.values()) == 5  # 3 ids, 1 sequence, 1 scalar group
    # The loader's batches still carry every feature; the model reads only its own.
    loss, (_, out) = task(_batch(), _derm(config, 64))
    assert torch.isfinite(loss) and out.logits.shape == (64, 2)
    with pytest.raises(ValueError, match=r"features \['user_id_typo'\] are not features"):
        build_downstream(spec, "ctr", _config(0, features=("user_id", "user_id_typo")), kind=kind)
    with pytest.raises(ValueError, match=r"features \['user_conv_seq'\]"):  # a cvr-only feature
        build_downstream(spec, "ctr", _config(0, features=("user_conv_seq",)), kind=kind)


@pytest.mark.parametrize("kind", ["ctr", "cvr"])
def test_builds_on_meta(kind):
    spec = tiny_spec()
    task = build_downstream(spec, "cvr", _config(4), kind=kind, device=torch.device("meta"))
    assert {p.device.type for p in task.parameters()} == {"meta"}
    split = build_downstream(spec, "cvr", _config(4), kind=kind, device=torch.device("cpu"), embedding_device=torch.device("meta"))
    devices = {n.split(".")[1]: p.device.type for n, p in split.named_parameters()}
    assert devices["ebc"] == devices["ec"] == "meta" and devices["derm"] == "cpu"


@pytest.mark.parametrize("kind", ["ctr", "cvr"])
@pytest.mark.parametrize("n_derm", [0, 4])
def test_fx_traces_like_torchrec_pipelines_do(kind, n_derm):
    torch.manual_seed(0)
    spec = tiny_spec()
    config = _config(n_derm, 8, derm_similarity=SIMILARITY if n_derm == 4 else ())
    model = build_downstream(spec, "ctr", config, kind=kind, device=torch.device("cpu")).model.eval()
    batch, derm = _batch(size=32), _derm(config, 32)
    traced = torchrec.fx.symbolic_trace(model)
    eager, fx = model(batch, derm), traced(batch, derm)
    torch.testing.assert_close(fx.logits, eager.logits)
    if kind == "ctr":
        torch.testing.assert_close(fx.gates, eager.gates)


def test_moe_and_projection_alone():
    torch.manual_seed(0)
    moe = MixtureOfDCNExperts(in_features=12, num_tasks=2, num_experts=3, cross_layers=2, low_rank=4, expert_hidden=(8,))
    x = torch.randn(5, 12)
    mixed, gates = moe(x)
    assert mixed.shape == (5, 2, 8) and gates.shape == (5, 2, 3)
    # Task input = Σ_e gate_t,e · expert_e(x), written out.
    experts = [e(x) for e in moe.experts]
    by_hand = sum(gates[:, 1, e : e + 1] * experts[e] for e in range(3))
    torch.testing.assert_close(mixed[:, 1], by_hand)
    proj = DERMProjection((DERMFeature("ctr_user", 6, 0), DERMFeature("ctr_pin", 6, 3)))
    derm = {"ctr_user": torch.randn(5, 6), "ctr_user_missing": torch.zeros(5, 1), "ctr_pin": torch.randn(5, 6), "ctr_pin_missing": torch.ones(5, 1)}
    out = proj(derm)
    assert out.shape == (5, 7 + 3) and proj.output_dim() == 10
    torch.testing.assert_close(out[:, :6], derm["ctr_user"])  # width 0: passed through with its indicator


def test_bad_configs_name_the_field():
    with pytest.raises(ValueError, match="num_experts must be >= 1"):
        DownstreamConfig(num_experts=0)
    with pytest.raises(ValueError, match=r"derm\['ctr_user'\].projection_dim must be >= 0"):
        DERMFeature("ctr_user", 8, -1)
    with pytest.raises(ValueError, match="derm lists an embedding twice"):
        DownstreamConfig(derm=(DERMFeature("ctr_user", 8), DERMFeature("ctr_user", 8)))
    with pytest.raises(ValueError, match=r"low_rank must be >= 1, or 0 \(full rank\) without cross_mixture"):
        DownstreamConfig(low_rank=0, cross_mixture=2)
    with pytest.raises(ValueError, match="expert_hidden must give at least one width"):
        DownstreamConfig(expert_hidden=())
    spec = tiny_spec()
    with pytest.raises(ValueError, match="kind must be one of"):
        build_downstream(spec, "ctr", _config(0), kind="dlrm")
    with pytest.raises(ValueError, match="task_weights has 1 entries"):
        build_downstream(spec, "ctr", _config(0, task_weights=(1.0,)))


def test_standardized_embeddings_spread_out_before_the_projection():
    torch.manual_seed(0)
    # unit vectors around one shared direction, as daily pools are: tiny per-dimension spread
    common = torch.nn.functional.normalize(torch.randn(1, 6), dim=1)
    emb = torch.nn.functional.normalize(common + 0.03 * torch.randn(64, 6), dim=1)
    proj = DERMProjection((DERMFeature("ctr_user", 6, 0, standardize=True),))
    derm = {"ctr_user": emb, "ctr_user_missing": torch.zeros(64, 1)}
    out = proj(derm)[:, :6]  # width 0: the standardized embedding, passed through
    assert emb.std(0).max() < 0.1 and torch.allclose(out.std(0, unbiased=False), torch.ones(6), atol=0.02)
    proj.eval()  # evaluation uses the running statistics, so one row alone is fine
    assert torch.isfinite(proj({"ctr_user": emb[:1], "ctr_user_missing": torch.zeros(1, 1)})).all()
    assert DERMProjection((DERMFeature("ctr_user", 6, 3),)).norm.keys() == set()  # off by default
