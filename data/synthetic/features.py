"""The feature spec of the synthetic ads world: what its two logs carry (DESIGN.md §Synthetic ads
world; the feature families of the paper's Appendix A and B.1).

The ctr (engagement) and cvr (conversion) logs share entities and most features; the cvr log adds
the user's offsite conversion sequence (Appendix B.1: "onsite engagement sequences and offsite
conversion sequences") and its conversion labels.
"""

from __future__ import annotations

from data.spec import DenseFeature, FeatureSpec, Keys, SequenceFeature, SideList, Source, SparseFeature
from data.synthetic.config import WorldConfig
from data.synthetic.simulate import N_ACTIONS
from data.synthetic.world import N_AGE_BUCKETS, N_COUNTRIES, N_GENDERS, PLATFORMS, SURFACES

SOURCES = (
    Source("ctr", labels=("click", "good_click"), oracle={"click": "p_click", "good_click": "p_good_click"}),
    Source(
        "cvr",
        labels=("conversion", "click_conversion", "view_conversion"),
        oracle={
            "conversion": "p_conversion",
            "click_conversion": "p_click_conversion",
            "view_conversion": "p_view_conversion",
        },
    ),
)


def synthetic_spec(cfg: WorldConfig) -> FeatureSpec:
    """The spec a world of this config writes beside its logs (``ROOT/spec.toml``)."""
    ids = lambda name, tower, n, dim=16, **kw: SparseFeature(name, tower, n, dim, **kw)  # noqa: E731
    age = SideList("age_days", "seq_age_days", "value", transform="log1p")
    return FeatureSpec(
        name="synthetic-ads",
        keys=Keys(),
        sources=SOURCES,
        sparse=(
            ids("user_id", "user", cfg.total_users),
            ids("user_gender", "user", N_GENDERS, 8),
            ids("user_age_bucket", "user", N_AGE_BUCKETS, 8),
            ids("user_country", "user", N_COUNTRIES, 8),
            ids("user_interests", "user", cfg.n_categories, 8, multi=True, pooling="mean"),
            ids("pin_id", "pin", cfg.total_pins),
            ids("advertiser_id", "pin", cfg.n_advertisers),
            ids("campaign_id", "pin", cfg.n_campaigns),
            ids("category_id", "pin", cfg.n_categories, 8),
            ids("surface", "interaction", len(SURFACES), 4),
            ids("hour_of_day", "interaction", 24, 4),
            ids("platform", "interaction", len(PLATFORMS), 4),
        ),
        sequence=(
            SequenceFeature(
                "user_seq", "user", cfg.total_pins, 16, cfg.seq_len, column="seq_pin_ids", table="seq_pin",
                side=(SideList("action", "seq_action", "id", num_embeddings=N_ACTIONS), age),
            ),
            SequenceFeature(
                "user_conv_seq", "user", cfg.total_pins, 16, cfg.conv_seq_len, column="conv_seq_pin_ids",
                table="seq_pin", side=(SideList("age_days", "conv_seq_age_days", "value", transform="log1p"),),
                sources=("cvr",),
            ),
        ),
        dense=(
            DenseFeature("user_impressions_1d", "user", transform="log1p"),
            DenseFeature("user_clicks_1d", "user", transform="log1p"),
            DenseFeature("user_ctr_smoothed", "user"),
            DenseFeature("user_pretrained", "user", width=cfg.pretrained_dim),
            DenseFeature("pin_impressions_1d", "pin", transform="log1p"),
            DenseFeature("pin_clicks_1d", "pin", transform="log1p"),
            DenseFeature("pin_ctr_smoothed", "pin"),
            DenseFeature("pin_pretrained", "pin", width=cfg.pretrained_dim),
            DenseFeature("user_advertiser_clicks", "interaction", transform="log1p"),
        ),
    )
