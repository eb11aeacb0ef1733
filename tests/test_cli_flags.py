"""`fastserve up` flags: vLLM's names, no prefix guessing, choices checked before anything starts."""

from __future__ import annotations

import importlib

import pytest

from fastserve.launcher import parse_args, scheduler_flags
from fastserve.services.scheduler import server as scheduler
from fastserve.services.scheduler.policy import POLICIES


def test_vllm_names_are_primary_and_old_names_still_work():
    args = parse_args(
        [
            "--tensor-parallel-size",
            "2",
            "--pipeline-parallel-size",
            "3",
            "--max-num-seqs",
            "8",
            "--max-model-len",
            "512",
            "--gpu-memory-utilization",
            "0.8",
            "--block-size",
            "32",
            "--served-model-name",
            "my-opt",
            "--api-key",
            "k1,k2",
        ]
    )
    assert (args.tp, args.pp, args.max_batch_size, args.max_model_len) == (2, 3, 8, 512)
    assert (args.gpu_memory_utilization, args.block_size, args.served_model_name) == (0.8, 32, "my-opt")
    old = parse_args(["--tp", "2", "--pp", "3", "--max-batch-size", "8"])
    assert (old.tp, old.pp, old.max_batch_size) == (2, 3, 8)
    short = parse_args(["-tp", "4"])
    assert short.tp == 4


def test_up_binds_loopback_by_default():
    args = parse_args([])
    assert args.host == "127.0.0.1" and args.http_port == 8000 and args.port == 50051


@pytest.mark.parametrize("service", ["gateway", "scheduler", "kvmanager", "worker"])
def test_every_service_alone_binds_loopback_by_default(service, monkeypatch):
    monkeypatch.delenv(f"FASTSERVE_{service.upper()}_HOST", raising=False)
    server = importlib.import_module(f"fastserve.services.{service}.server")
    assert server.parse_args([]).host == "127.0.0.1"
    assert server.parse_args(["--host", "0.0.0.0"]).host == "0.0.0.0"


def test_no_prefix_matching(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--max-num", "8"])  # used to be taken as --max-num-batched-tokens
    assert "unrecognized arguments: --max-num" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag, value",
    [("--policy", "skip-join-mlfqq"), ("--swap-policy", "proactiv")],
)
def test_up_checks_scheduler_choices_itself(capsys, flag, value):
    with pytest.raises(SystemExit):
        parse_args([flag, value])
    err = capsys.readouterr().err
    assert f"invalid choice: '{value}'" in err and err.startswith("usage: fastserve up")
    if flag == "--policy":  # the list comes from the scheduler's policy registry
        assert all(name in err for name in POLICIES)


def test_every_registered_policy_is_accepted():
    for name in POLICIES:
        assert parse_args(["--policy", name]).policy == name


def test_ssl_files_go_together(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--ssl-certfile", "cert.pem"])
    assert "--ssl-certfile and --ssl-keyfile go together" in capsys.readouterr().err


def test_policy_help_names_every_registered_policy_and_what_it_does(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, even inside a name
    for name, cls in POLICIES.items():
        assert cls.summary and "".join(f"{name}: {cls.summary}".split()) in text, name


@pytest.mark.parametrize(
    "flags, expected",
    [
        ([], "auto"),
        (["--async-scheduling"], "true"),
        (["--async-scheduling", "off"], "false"),
        (["--async-scheduling", "True"], "true"),
    ],
)
def test_async_scheduling_reaches_the_scheduler(flags, expected):
    """`up`'s flag, parsed by the scheduler's own parser from the command line `up` gives it."""
    argv = scheduler_flags(parse_args(flags), 1, 2, "m", ["127.0.0.1:3"], "127.0.0.1:4")
    args = scheduler.parse_args(argv)
    assert args.async_scheduling == expected
    assert scheduler.parse_args([]).async_scheduling == parse_args([]).async_scheduling  # one default
    with pytest.raises(SystemExit):
        scheduler.parse_args(["--async-scheduling", "sometimes"])


def test_async_scheduling_auto_overlaps_steps_on_gpu_workers_only():
    assert scheduler.overlap_steps("auto", "cuda:0") and not scheduler.overlap_steps("auto", "cpu")
    assert scheduler.overlap_steps("true", "cpu") and not scheduler.overlap_steps("false", "cuda:1")


def test_stream_interval_reaches_the_scheduler_and_below_one_is_refused(capsys):
    argv = scheduler_flags(parse_args(["--stream-interval", "4"]), 1, 2, "m", ["127.0.0.1:3"], "127.0.0.1:4")
    assert scheduler.parse_args(argv).stream_interval == 4
    assert scheduler.parse_args([]).stream_interval == 1
    with pytest.raises(SystemExit):
        scheduler.parse_args(["--stream-interval", "0"])
    assert "--stream-interval must be >= 1, got 0" in capsys.readouterr().err
