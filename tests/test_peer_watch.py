"""The peer watch's judgement (Silence), fed the beats a store would serve."""

from __future__ import annotations

from fastserve.services.worker.peer_watch import Silence


def test_a_peer_that_never_beats_is_declared_silent_after_the_timeout():
    silence = Silence(timeout_s=5.0)
    assert silence.why_leave({1: b""}, now=100.0) is None  # first seen: its clock starts here
    assert silence.why_leave({1: b""}, now=104.0) is None
    why = silence.why_leave({1: b""}, now=106.0)
    assert why is not None and "rank 1 has not beaten for 6.0s" in why


def test_a_beating_peer_stays_and_a_stalled_or_restarted_one_is_noticed():
    silence = Silence(timeout_s=5.0)
    for t in range(10):
        assert silence.why_leave({1: f"a:{t}".encode()}, now=100.0 + t) is None
    assert silence.why_leave({1: b"a:9"}, now=114.0) is None
    assert "has not beaten" in (silence.why_leave({1: b"a:9"}, now=115.5) or "")
    restarted = Silence(timeout_s=5.0)
    assert restarted.why_leave({1: b"a:1"}, now=0.0) is None
    assert "was restarted" in (restarted.why_leave({1: b"b:1"}, now=1.0) or "")
