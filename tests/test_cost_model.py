"""The cost model: fitting, presets, parsing."""

from __future__ import annotations

import pytest

from services.scheduler.policy import CostModel
from services.scheduler.policy.cost_model import opt_13b_a100


def test_fit_recovers_coefficients_from_mixed_iterations():
    truth = CostModel(c0=0.02, c_prefill=1e-4, c_decode=5e-4, c_ctx=1e-6)
    samples = [
        (p, d, c, truth.time(p, d, c))
        for p, d, c in [
            (16, 0, 16),
            (256, 0, 256),
            (0, 1, 64),
            (0, 8, 900),
            (0, 16, 4000),
            (100, 4, 700),
            (512, 2, 2000),
        ]
    ]
    fitted = CostModel().fit(samples)
    for name in ("c0", "c_prefill", "c_decode", "c_ctx"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=1e-3)


def test_fit_never_goes_negative():
    fitted = CostModel().fit([(16, 0, 16, 0.002), (1024, 0, 1024, 0.15), (0, 1, 64, 0.001)])
    assert min(fitted.to_dict().values()) >= 0


def test_preset_matches_its_derivation():
    model = opt_13b_a100()
    assert model.decode_time(1) == pytest.approx(
        26e9 / (0.8 * 1.555e12) + 2 * 13e9 / (0.5 * 312e12), rel=1e-9
    )
    assert 0.02 < model.decode_time(16, 16 * 500) < 0.04
    assert CostModel.resolve("opt-13b-a100") == model


def test_coefficients_flag_and_errors():
    assert CostModel.resolve("c0=0.5,c_ctx=1e-6").to_dict() == {
        "c0": 0.5,
        "c_prefill": 0.0,
        "c_decode": 0.0,
        "c_ctx": 1e-6,
    }
    with pytest.raises(ValueError, match="unknown coefficient"):
        CostModel.resolve("speed=3")
