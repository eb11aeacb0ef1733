"""`up`'s judgement of its children, without processes: a silent child is hung only after it has
answered since its (re)start and then stayed silent past the step timeout (+ margin); an unwritable
--data-dir is one line naming it."""

from __future__ import annotations

import time

import pytest

from fastserve.launcher import check_writable
from fastserve.liveness import HANG_MARGIN, Liveness


def test_a_child_is_hung_only_after_answering_and_then_staying_silent_past_the_timeout():
    # timestamps 30 s either side of the timeout: this process may be descheduled between two lines
    liveness = Liveness(dict, step_timeout=60.0)
    assert liveness.hung("worker0", 100) == 0.0  # never answered: still starting
    liveness.answered["worker0"] = (100, time.monotonic() - (60.0 + HANG_MARGIN) + 30.0)
    assert liveness.hung("worker0", 100) == 0.0  # silent, but not long enough
    liveness.answered["worker0"] = (100, time.monotonic() - (60.0 + HANG_MARGIN) - 30.0)
    assert liveness.hung("worker0", 100) > 60.0 + HANG_MARGIN
    assert liveness.hung("worker0", 101) == 0.0  # restarted since: a new process starts unjudged


def test_an_unwritable_data_dir_is_one_line_naming_it_and_the_flag(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(RuntimeError) as failed:
        check_writable(blocker / "redis-50051")
    message = str(failed.value)
    assert "--data-dir" in message and str(blocker) in message and "\n" not in message
    check_writable(tmp_path / "fine" / "redis-50051")  # created when missing
    assert (tmp_path / "fine" / "redis-50051").is_dir()
