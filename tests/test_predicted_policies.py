"""The policies that read a predicted output length: ordering, starvation guard, join levels."""

from __future__ import annotations

import pytest

from fastserve.bench.simulator import SimConfig, simulate
from fastserve.bench.workloads import noisy_predictions
from fastserve.services.scheduler.policy import (
    BatchLimits,
    CostModel,
    Job,
    PolicyConfig,
    make_policy,
    needs_prediction,
)
from fastserve.services.scheduler.policy.predicted import lognormal_quantiles

PREDICTED = ["predicted-srpt", "predicted-gittins", "predicted-skip-join-mlfq", "predicted-order-mlfq"]
COST = CostModel(c0=0.02, c_prefill=1e-4, c_decode=1e-3)  # one decode iteration: 21 ms = q0


def job(rid: str, predicted: int | None, arrival: float = 0.0, prompt: int = 10, output: int = 50) -> Job:
    # max_tokens and output_len say the opposite of the prediction: the policies must not read them
    return Job(rid, prompt, 10_000 - output, arrival, output_len=10_000 - output, predicted_len=predicted)


def policy(name: str, **kw):
    return make_policy(PolicyConfig(name=name, **kw), COST)


def ids(p, now: float = 0.0) -> list[str]:
    return [j.request_id for j in p.order(now)]


@pytest.mark.parametrize("name", PREDICTED)
def test_a_job_without_a_prediction_is_refused_naming_the_flag(name):
    assert needs_prediction(name)
    with pytest.raises(ValueError, match="--length-predictor"):
        policy(name).add(job("a", None), 0.0)


def test_predicted_srpt_runs_the_fewest_predicted_remaining_tokens_first():
    p = policy("predicted-srpt")
    for rid, pred, t in (("long", 300, 0.0), ("short", 20, 1.0), ("mid", 100, 2.0)):
        p.add(job(rid, pred, t), t)
    assert ids(p) == ["short", "mid", "long"]
    long = p.jobs["long"]
    long.num_generated = 290  # 10 predicted tokens left: now the shortest
    p.on_iteration_done([long], 0.02, 3.0)
    assert ids(p) == ["long", "short", "mid"]
    long.num_generated = 400  # past its prediction: 1 left, still first
    p.on_iteration_done([long], 0.02, 3.1)
    assert ids(p)[0] == "long"


def test_predicted_srpt_promotes_a_starved_job_for_one_quantum():
    p = policy("predicted-srpt", starvation_threshold=5.0, starvation_period=1)
    p.add(job("long", 500, 0.0), 0.0)
    p.add(job("short", 10, 0.0), 0.0)
    short = p.jobs["short"]
    transitions = p.on_iteration_done([short], 0.021, 4.0)
    assert transitions == [] and ids(p) == ["short", "long"]
    transitions = p.on_iteration_done([short], 0.021, 6.0)  # long has waited 6 s > α
    assert [(t.kind, t.request_id) for t in transitions] == [("promoted", "long")]
    assert ids(p) == ["long", "short"] and p.jobs["long"].promotions == 1
    p.on_iteration_done([p.jobs["long"]], 0.021, 6.1)  # one Q0 quantum (21 ms) used: back in rank
    assert ids(p) == ["short", "long"]


def test_predicted_gittins_prefers_short_predictions_and_sinks_a_job_past_its_distribution():
    p = policy("predicted-gittins", extra={"prediction_sigma": 0.5})
    for rid, pred in (("long", 400), ("short", 20)):
        p.add(job(rid, pred), 0.0)
    assert ids(p) == ["short", "long"]
    short = p.jobs["short"]
    short.num_generated = int(20 * max(lognormal_quantiles(0.5))) + 1  # past every support point
    p.on_iteration_done([short], 0.02, 1.0)
    assert ids(p) == ["long", "short"]


def test_predicted_gittins_takes_its_spread_from_the_config():
    narrow = policy("predicted-gittins", extra={"prediction_sigma": 0.1})
    wide = policy("predicted-gittins", extra={"prediction_sigma": 1.5})
    assert max(narrow.shape) < 1.5 < max(wide.shape)


def test_predicted_skip_join_enters_where_a_job_of_its_predicted_length_would_finish():
    p = policy("predicted-skip-join-mlfq", num_queues=8)
    # q0 = 21 ms doubling: cumulative 21, 63, 147, 315 ms ... ; a job of n tokens needs ~n x 21 ms
    for rid, pred, prompt in (("one", 1, 10), ("five", 5, 10), ("fifty", 50, 10), ("big-prompt", 1, 2000)):
        p.add(job(rid, pred, prompt=prompt), 0.0)
    levels = {rid: j.level for rid, j in p.jobs.items()}
    assert levels["one"] == 0 and levels["five"] == 2 and levels["fifty"] == 5
    skip = policy("skip-join-mlfq", num_queues=8)
    skip.add(job("big-prompt", 1, prompt=2000), 0.0)
    assert levels["big-prompt"] == skip.jobs["big-prompt"].level > 0  # never above its skip-join level


def test_predicted_order_mlfq_sorts_within_a_queue_but_keeps_the_queues():
    p = policy("predicted-order-mlfq", num_queues=4)
    for rid, pred, t in (("a", 300, 0.0), ("b", 30, 1.0), ("c", 3, 2.0)):
        p.add(job(rid, pred, t), t)
    assert ids(p) == ["c", "b", "a"]  # all in Q0: by predicted remaining, not arrival
    c = p.jobs["c"]
    p.on_iteration_done([c], 0.05, 3.0)  # past q0: demoted to Q1
    assert c.level == 1 and ids(p) == ["b", "a", "c"]


def test_noisy_predictions_keep_the_trace_and_scale_the_truth():
    trace = [(0.1 * i, 10, 5 + i) for i in range(50)]
    exact = noisy_predictions(trace, 0.0, 0)
    assert [r[:3] for r in exact] == trace and all(r[3] == r[2] for r in exact)
    noisy = noisy_predictions(trace, 1.0, 0)
    assert noisy == noisy_predictions(trace, 1.0, 0) and any(r[3] != r[2] for r in noisy)


@pytest.mark.parametrize("name", PREDICTED)
def test_predicted_policies_finish_every_job_in_the_simulator(name):
    trace = noisy_predictions([(0.05 * i, 20 + 7 * (i % 5), 5 + 13 * (i % 7)) for i in range(40)], 0.5, 0)
    config = SimConfig(policy=name, limits=BatchLimits(4, 512), num_gpu_blocks=200)
    records = simulate(trace, config, CostModel(c0=0.02, c_prefill=1e-4, c_decode=1e-4))
    assert len(records) == 40


def test_predicted_srpt_with_exact_predictions_schedules_as_the_oracle():
    trace = noisy_predictions([(0.01 * i, 30, 3 + (17 * i) % 60) for i in range(30)], 0.0, 0)
    cost = CostModel(c0=0.02, c_prefill=1e-4, c_decode=1e-4)
    runs = {}
    for name in ("predicted-srpt", "srpt-oracle"):
        config = SimConfig(policy=name, limits=BatchLimits(2, 512), num_gpu_blocks=400)
        runs[name] = [r["finish"] for r in sorted(simulate(trace, config, cost), key=lambda r: r["arrival"])]
    assert runs["predicted-srpt"] == pytest.approx(runs["srpt-oracle"])


def test_the_scheduler_refuses_a_predicted_policy_without_a_length_predictor(capsys):
    from fastserve.services.scheduler.server import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--policy", "predicted-srpt"])
    assert "--policy predicted-srpt needs --length-predictor" in capsys.readouterr().err
    assert (
        parse_args(["--policy", "predicted-srpt", "--length-predictor", "m.npz"]).length_predictor == "m.npz"
    )
