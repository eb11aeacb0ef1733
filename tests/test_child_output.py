"""`fastserve up` relays its children's output and finds the reason a child died."""

from __future__ import annotations

import io
import os

from fastserve.child_output import Relay


def relay_of(text: str, out: io.StringIO | None = None) -> Relay:
    relay = Relay(out or io.StringIO())
    read, write = os.pipe()
    os.write(write, text.encode())
    os.close(write)
    relay.follow("worker0", os.fdopen(read, "rb"))
    relay.threads["worker0"].join(5)
    return relay


def test_the_cause_not_the_shutdown_noise_is_the_fatal_reason():
    text = (
        "2026 worker0 INFO listening\n"
        "Traceback (most recent call last):\n"
        '  File "x.py", line 1, in <module>\n'
        "ValueError: /ckpt: model_type 'gpt2' is not 'opt'\n"
        "Exception ignored in: <function Server.__del__ at 0x1>\n"
        "Traceback (most recent call last):\n"
        "RuntimeError: Event loop is closed\n"
    )
    assert relay_of(text).fatal_reason("worker0") == "/ckpt: model_type 'gpt2' is not 'opt'"


def test_a_flag_error_is_a_fatal_reason():
    text = "usage: fastserve worker [-h]\nfastserve worker: error: argument --tp: invalid int value: 'x'\n"
    assert relay_of(text).fatal_reason("worker0") == "argument --tp: invalid int value: 'x'"
    assert relay_of("just logs\n").fatal_reason("worker0") is None


def test_held_lines_come_out_after_release_in_order():
    out = io.StringIO()
    relay = Relay(out)
    relay.hold()
    read, write = os.pipe()
    os.write(write, b"one\ntwo\n")
    os.close(write)
    relay.follow("w", os.fdopen(read, "rb"))
    relay.threads["w"].join(5)
    assert out.getvalue() == ""
    relay.release()
    assert out.getvalue() == "one\ntwo\n"
