"""The cost model: fitting, presets, parsing."""

from __future__ import annotations

import pytest

from fastserve.services.scheduler.policy import CostModel
from fastserve.services.scheduler.policy.cost_model import opt_13b_a100


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


def test_iteration_time_of_a_mixed_batch():
    from fastserve.services.scheduler.policy import Job

    model = CostModel(c0=0.01, c_prefill=1e-4, c_decode=1e-3, c_ctx=1e-6)
    batch = [Job("p", 100, 10, 0.0), Job("d", 50, 10, 0.0, num_generated=5, needs_prefill=False)]
    assert model.iteration_time(batch) == pytest.approx(0.01 + 100e-4 + 1e-3 + 155e-6)
    assert model.prefill_time(100, batch_size=2) == pytest.approx(0.01 + 200e-4 + 200e-6)
    assert model.decode_time(4, 1000) == pytest.approx(0.01 + 4e-3 + 1000e-6)


def test_online_observations_refine_the_fit_and_keep_the_profile():
    truth = CostModel(c0=0.02, c_prefill=1e-4, c_decode=5e-4, c_ctx=1e-6)
    profile = [
        (p, d, c, truth.time(p, d, c)) for p, d, c in [(16, 0, 16), (512, 0, 512), (0, 1, 64), (0, 16, 2000)]
    ]
    model = CostModel().fit(profile)
    slower = CostModel(c0=0.03, c_prefill=1e-4, c_decode=5e-4, c_ctx=1e-6)  # e.g. the host got busier
    for i in range(2000):  # decode-only iterations: many more than the window holds
        d, c = 1 + i % 16, 100 + 37 * i % 3000
        model.observe((0, d, c, slower.time(0, d, c)), refit_every=16)
    assert len(model.samples) == model.samples.maxlen  # a sliding window
    assert model.c0 == pytest.approx(0.03, rel=0.15)  # follows the live iterations
    assert model.c_prefill > 0  # the start-up profile still pins what decode steps never show


def test_incremental_statistics_match_a_fresh_fit():
    truth = CostModel(c0=0.015, c_prefill=2e-4, c_decode=3e-4, c_ctx=2e-6)
    shapes = [(p, d, p + 40 * d) for p in (0, 8, 64, 300) for d in (0, 1, 4, 15) if p or d]
    samples = [
        (p, d, c, truth.time(p, d, c) * (1 + 0.01 * ((i * 7) % 5 - 2))) for i, (p, d, c) in enumerate(shapes)
    ]
    online = CostModel()
    for s in samples:
        online.observe(s, refit_every=1)
    batch = CostModel().fit(samples)
    for name in ("c0", "c_prefill", "c_decode", "c_ctx"):
        assert getattr(online, name) == pytest.approx(getattr(batch, name), rel=1e-6, abs=1e-12)


def test_fit_is_relative_so_small_steps_are_not_drowned_by_big_ones():
    # a decode step of 2 ms must come out right next to a 2 s prefill
    truth = CostModel(c0=0.002, c_prefill=0.002)
    samples = [(p, 0, 0, truth.time(p, 0, 0) * (1.02 if p > 500 else 1.0)) for p in (0, 0, 0, 1000)]
    samples += [(0, 1, 0, 0.002)] * 3
    fitted = CostModel().fit(samples)
    assert fitted.decode_time(1) == pytest.approx(0.002, rel=0.02)


def test_file_round_trip(tmp_path):
    path = tmp_path / "cost.json"
    model = CostModel(c0=0.02, c_prefill=1e-4, c_decode=2e-4, c_ctx=3e-7)
    model.to_file(str(path))
    assert CostModel.resolve(str(path)) == model
