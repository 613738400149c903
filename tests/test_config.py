import math

import pytest

from tokenprune import PruneConfig


def test_defaults_are_the_seeds():
    cfg = PruneConfig()
    assert (cfg.k_anchors, cfg.top_m, cfg.alpha, cfg.score_norm, cfg.layer, cfg.backend) == \
        (10, 50, 0.5, "none", -1, "auto")
    assert cfg.kept_patches == 60


@pytest.mark.parametrize("field, value, allowed", [
    ("k_anchors", 0, ">= 1"), ("k_anchors", -3, ">= 1"), ("k_anchors", 2.5, "integer"),
    ("k_anchors", True, "integer"), ("k_anchors", "10", "integer"), ("k_anchors", math.nan, "integer"),
    ("top_m", -1, ">= 0"), ("top_m", 5.0, "integer"), ("top_m", None, "integer"),
    ("alpha", -0.01, "[0, 1]"), ("alpha", 1.5, "[0, 1]"), ("alpha", math.nan, "[0, 1]"),
    ("alpha", math.inf, "[0, 1]"), ("alpha", "0.5", "[0, 1]"), ("alpha", True, "[0, 1]"),
    ("score_norm", "l2", "'minmax'"), ("backend", "cuda", "'triton'"),
    ("layer", 1.5, "integer"), ("layer", None, "integer"),
    # A wrong type is named with the value, so that 1.0 or "3" does not read like an integer.
    ("layer", 1.0, "got float 1.0"), ("top_m", 5.0, "got float 5.0"),
    ("k_anchors", "10", "got str '10'"),
])
def test_bad_values_name_parameter_value_and_range(field, value, allowed):
    with pytest.raises(ValueError) as err:
        PruneConfig(**{field: value})
    message = str(err.value)
    assert message.startswith(field) and repr(value) in message and allowed in message


def test_numpy_like_numbers_become_plain_python():
    np = pytest.importorskip("numpy")
    cfg = PruneConfig(k_anchors=np.int64(3), top_m=np.int32(0), alpha=np.float32(1.0), layer=np.int64(-2))
    assert (type(cfg.k_anchors), type(cfg.top_m), type(cfg.alpha), type(cfg.layer)) == (int, int, float, int)
    assert (cfg.k_anchors, cfg.top_m, cfg.alpha, cfg.layer) == (3, 0, 1.0, -2)


def test_edges_of_the_ranges_are_allowed():
    PruneConfig(k_anchors=1, top_m=0, alpha=0.0)
    PruneConfig(alpha=1, score_norm="minmax", backend="reference", layer=5)


def test_selection_and_seed_are_validated():
    assert PruneConfig().selection == "score" and PruneConfig().seed == 0
    for selection in ("score", "cls", "mmr", "random"):
        assert PruneConfig(selection=selection).selection == selection
    with pytest.raises(ValueError, match="selection must be one of 'score', 'cls', 'mmr', "
                                         "'random', got 'fastervlm'"):
        PruneConfig(selection="fastervlm")
    with pytest.raises(ValueError, match="seed must be an integer >= 0, got -1"):
        PruneConfig(seed=-1)


@pytest.mark.parametrize("value", [-0.1, 1.01, math.nan, math.inf, "0.5", True, None])
def test_mmr_lambda_is_validated(value):
    with pytest.raises(ValueError) as err:
        PruneConfig(selection="mmr", mmr_lambda=value)
    assert str(err.value) == f"mmr_lambda must be a finite number in [0, 1], got {value!r}"


def test_mmr_lambda_default_and_edges():
    assert PruneConfig().mmr_lambda == 0.8
    np = pytest.importorskip("numpy")
    for value in (0, 1, np.float32(0.25)):
        cfg = PruneConfig(selection="mmr", mmr_lambda=value)
        assert type(cfg.mmr_lambda) is float and cfg.mmr_lambda == float(value)
