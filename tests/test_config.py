import pytest

from paca_lightning import PaCAConfig


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(rank=0), ValueError, r"rank must be a positive int \(>= 1\), got 0"),
    (dict(rank=-3), ValueError, "got -3"),
    (dict(rank=2.5), TypeError, "rank must be a positive int"),
    (dict(alpha=0), ValueError, "alpha must be > 0, got 0"),
    (dict(alpha=-1.0), ValueError, "alpha must be > 0"),
    (dict(selection="magnitude"), ValueError, r"selection='magnitude' is not valid; choose one of "
                                              r"\['random', 'weight_norm', 'gradient'\]"),
    (dict(bias="paca_only"), ValueError, r"bias='paca_only' is not valid; choose one of \['none', 'all'\]"),
    (dict(target_modules=[]), ValueError, "empty list"),
    (dict(target_modules="q_proj("), ValueError, "not a valid regex"),
    (dict(target_modules=[3]), TypeError, "list of module names"),
    (dict(rank_pattern={"q_proj": 0}), ValueError, r"rank_pattern\['q_proj'\] must be a positive int"),
    (dict(alpha_pattern={"q_proj": -2}), ValueError, r"alpha_pattern\['q_proj'\] must be > 0"),
    (dict(seed="0"), TypeError, "seed must be an int"),
    (dict(paca_dtype="float64x"), ValueError, "paca_dtype"),
])
def test_invalid_config_is_rejected_at_construction(kwargs, error, message):
    with pytest.raises(error, match=message):
        PaCAConfig(**kwargs)


def test_round_trip_through_dict_and_unknown_fields():
    config = PaCAConfig(rank=8, alpha=16, target_modules=("q_proj", "v_proj"), rank_pattern={"v_proj": 4})
    assert config.target_modules == ["q_proj", "v_proj"]
    assert PaCAConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"unknown PaCAConfig fields \['lora_dropout'\]"):
        PaCAConfig.from_dict({**config.to_dict(), "lora_dropout": 0.1})


def test_patterns_override_rank_and_alpha_per_module():
    config = PaCAConfig(rank=8, alpha=16, rank_pattern={r"layers\.0\..*": 2}, alpha_pattern={"down_proj": 4})
    assert config.rank_for("model.layers.0.mlp.up_proj") == 2
    assert config.rank_for("model.layers.10.mlp.up_proj") == 8
    assert config.alpha_for("model.layers.3.mlp.down_proj") == 4
    assert config.alpha_for("model.layers.3.mlp.up_proj") == 16
