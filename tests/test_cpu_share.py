"""The worker's thread governor and its OpenMP start-up environment."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from fastserve.procs import free_port
from fastserve.services.worker import cpu_share
from fastserve.services.worker.cpu_share import ThreadGovernor, busy_seconds
from fastserve.services.worker.omp_env import MALLOC_TUNABLES, PRELOADED, openmp_defaults, preload_env

HZ = cpu_share.CLOCK_TICKS


def stat_text(busy: dict[int, float], idle: float = 0.0) -> str:
    """A /proc/stat with each CPU's busy seconds split over user and system (and some iowait, not busy)."""
    lines = ["cpu  1 2 3 4 5 6 7 8 0 0"]
    for cpu, seconds in busy.items():
        ticks = int(seconds * HZ)
        lines.append(f"cpu{cpu} {ticks // 2} 0 {ticks - ticks // 2} {int(idle * HZ)} 7 0 0 0 0 0")
    return "\n".join([*lines, "intr 1 2 3", "ctxt 9"])


def test_busy_seconds_counts_only_the_given_cpus_and_not_idle_or_iowait():
    text = stat_text({0: 10.0, 1: 4.0, 2: 100.0}, idle=50.0)
    assert busy_seconds({0, 1}, text) == pytest.approx(14.0)
    assert busy_seconds({5}, text) is None


class Machine:
    """A fake clock, /proc/stat and process CPU time, advanced by what the test says ran."""

    def __init__(self) -> None:
        self.t, self.own, self.busy = 100.0, 0.0, {0: 0.0, 1: 0.0}

    def run(self, seconds: float, own_cores: float, other_cores: float) -> None:
        self.t += seconds
        self.own += own_cores * seconds
        used = (own_cores + other_cores) * seconds
        self.busy = {0: self.busy[0] + used / 2, 1: self.busy[1] + used / 2}

    def governor(self, max_threads: int = 2) -> ThreadGovernor:
        return ThreadGovernor(
            max_threads,
            {0, 1},
            interval=0.5,
            read_stat=lambda: stat_text(self.busy),
            own_cpu=lambda: self.own,
            clock=lambda: self.t,
        )


def test_threads_follow_the_cores_other_processes_leave_free_after_two_agreeing_readings():
    m = Machine()
    gov = m.governor()
    assert gov.threads() == 2
    m.run(0.6, own_cores=1.9, other_cores=0.1)  # quiet: the step has both cores
    assert gov.threads() == 2
    m.run(0.6, own_cores=1.0, other_cores=1.0)  # another process keeps a core busy
    assert gov.threads() == 2  # one reading is not enough
    assert gov.others == pytest.approx(1.0, abs=0.05)
    m.run(0.1, own_cores=1.0, other_cores=1.0)
    assert gov.threads() == 2  # read at most every interval
    m.run(0.6, own_cores=1.0, other_cores=1.0)
    assert gov.threads() == 1
    m.run(0.6, own_cores=1.0, other_cores=0.2)  # it left
    assert gov.threads() == 1
    m.run(0.6, own_cores=1.0, other_cores=0.2)
    assert gov.threads() == 2
    m.run(0.6, own_cores=0.5, other_cores=3.0)  # more than every core: one thread, never zero
    gov.threads()
    m.run(0.6, own_cores=0.5, other_cores=3.0)
    assert gov.threads() == 1


def test_an_unreadable_proc_stat_keeps_the_thread_count():
    m = Machine()
    gov = ThreadGovernor(2, {0, 1}, read_stat=lambda: "", own_cpu=lambda: m.own, clock=lambda: m.t)
    m.run(5.0, own_cores=0.0, other_cores=2.0)
    assert gov.threads() == 2 and ThreadGovernor(8, {0, 1}).max_threads == 2


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to give one away")
def test_a_real_busy_process_on_one_of_our_cpus_takes_a_thread_away():
    cpus = sorted(os.sched_getaffinity(0))[:2]
    gov = ThreadGovernor(2, set(cpus), interval=0.3)
    loop = f"import os, time\nos.sched_setaffinity(0, {{{cpus[1]}}})\nend = time.time() + 60\nwhile time.time() < end: pass"
    busy = subprocess.Popen([sys.executable, "-c", loop])
    try:
        deadline = time.monotonic() + 30
        while gov.threads() != 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        # whatever else runs beside this test only adds to what the others take
        assert gov.threads() == 1 and gov.others > 0.5
        import torch

        before = torch.get_num_threads()
        try:
            assert gov.apply() == 1 and torch.get_num_threads() == 1
        finally:
            torch.set_num_threads(before)
    finally:
        busy.kill()
        busy.wait()


def test_openmp_defaults_spin_briefly_when_adaptive_and_leave_user_settings_alone():
    assert openmp_defaults([], {}) == {"GOMP_SPINCOUNT": "30000", "KMP_BLOCKTIME": "1"}
    assert openmp_defaults(["--adaptive-threads", "false"], {}) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert openmp_defaults(["--adaptive-threads=no"], {}) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert openmp_defaults([], {"FASTSERVE_ADAPTIVE_THREADS": "0"}) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert openmp_defaults(["--adaptive-threads", "true"], {"FASTSERVE_ADAPTIVE_THREADS": "0"}) == {
        "GOMP_SPINCOUNT": "30000",
        "KMP_BLOCKTIME": "1",
    }
    assert openmp_defaults([], {"OMP_WAIT_POLICY": "ACTIVE"}) == {}
    assert openmp_defaults([], {"GOMP_SPINCOUNT": "0"}) == {}
    assert openmp_defaults([], {"KMP_BLOCKTIME": "200"}) == {}


def fake_libs(tmp_path, tcmalloc: bool = True) -> tuple[str, list[str], str, str]:
    """A venv prefix holding lib/libiomp5.so and a system lib dir holding tcmalloc (or not)."""
    (tmp_path / "venv" / "lib").mkdir(parents=True)
    (tmp_path / "sys").mkdir()
    openmp = tmp_path / "venv" / "lib" / "libiomp5.so"
    openmp.write_bytes(b"")
    tcm = tmp_path / "sys" / "libtcmalloc_minimal.so.4"
    if tcmalloc:
        tcm.write_bytes(b"")
    return str(tmp_path / "venv"), [str(tmp_path / "sys")], str(openmp), str(tcm)


def test_a_cpu_worker_preloads_intel_openmp_and_tcmalloc_once_and_keeps_what_the_user_preloaded(tmp_path):
    prefix, dirs, openmp, tcm = fake_libs(tmp_path)
    assert preload_env([], {}, prefix, dirs) == {"LD_PRELOAD": f"{openmp}:{tcm}", PRELOADED: "1"}
    # what the user preloads stays, after ours; a library already there is not added twice
    assert preload_env([], {"LD_PRELOAD": f"/x/libfoo.so {tcm}"}, prefix, dirs) == {
        "LD_PRELOAD": f"{openmp}:/x/libfoo.so:{tcm}",
        PRELOADED: "1",
    }
    assert preload_env([], {"LD_PRELOAD": f"{openmp}:{tcm}"}, prefix, dirs) == {}
    # started again already, on CUDA, or turned off (flag or environment): nothing to do
    assert preload_env([], {PRELOADED: "1"}, prefix, dirs) == {}
    assert preload_env(["--device", "cuda"], {}, prefix, dirs) == {}
    assert preload_env(["--preload-libs=none"], {}, prefix, dirs) == {}
    assert preload_env([], {"FASTSERVE_PRELOAD_LIBS": "none"}, prefix, dirs) == {}
    # a list given by the user is preloaded as it is, and a missing library is named
    assert preload_env(["--preload-libs", tcm], {}, prefix, dirs) == {"LD_PRELOAD": tcm, PRELOADED: "1"}
    with pytest.raises(SystemExit, match="--preload-libs: no such library: /nope.so"):
        preload_env(["--preload-libs", f"{tcm}:/nope.so"], {}, prefix, dirs)


def test_without_tcmalloc_glibc_keeps_freed_memory_unless_the_user_tuned_it(tmp_path):
    prefix, dirs, openmp, _ = fake_libs(tmp_path, tcmalloc=False)
    assert preload_env([], {}, prefix, dirs) == {
        "LD_PRELOAD": openmp,
        "GLIBC_TUNABLES": MALLOC_TUNABLES,
        PRELOADED: "1",
    }
    assert preload_env([], {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, prefix, dirs) == {
        "LD_PRELOAD": openmp,
        PRELOADED: "1",
    }


def mapped_libraries(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as maps:
        return maps.read()


@pytest.mark.skipif(
    not os.path.isfile(os.path.join(sys.prefix, "lib", "libiomp5.so")),
    reason="no intel-openmp wheel (not x86_64)",
)
@pytest.mark.parametrize("setting", ["auto", "none"])
def test_the_worker_process_itself_runs_with_intel_openmp_mapped(setting):
    """Started as `up` and compose start it: the same pid (an exec, not a child) has libiomp5 mapped
    by the time torch has loaded its OpenMP; with --preload-libs none, GNU's OpenMP alone."""
    argv = [sys.executable, "-m", "fastserve.services.worker", "--model", "opt-tiny", "--device", "cpu"]
    argv += [
        "--port",
        str(free_port()),
        "--metrics-port",
        "0",
        "--preload-libs",
        setting,
        "--swap-space",
        "0",
    ]
    env = {
        k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", PRELOADED, "FASTSERVE_PRELOAD_LIBS")
    }
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while "libgomp" not in (maps := mapped_libraries(proc.pid)):  # torch has loaded its OpenMP
            assert proc.poll() is None and time.monotonic() < deadline, (
                proc.stdout.read() if proc.poll() else "slow"
            )
            time.sleep(0.2)
        assert ("libiomp5.so" in maps) == (setting == "auto")
    finally:
        proc.kill()
        proc.wait()
