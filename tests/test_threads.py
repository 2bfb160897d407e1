"""engine.threads: intra-op threads from the usable cores minus the ones other processes keep busy."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import torch

from engine.threads import (
    available_cores,
    busy_elsewhere,
    choose_threads,
    configure_threads,
    explicit_threads,
)


def test_choose_threads_leaves_busy_cores_alone():
    assert choose_threads(2, 0.0) == 2
    assert choose_threads(2, 0.2) == 2  # a little background noise keeps both
    assert choose_threads(2, 0.5) == 1  # half a core taken: a second thread would spin against it
    assert choose_threads(2, 1.0) == 1
    assert choose_threads(2, 7.0) == 1  # never below one
    assert choose_threads(16, 3.0) == 13
    assert choose_threads(1, 0.0) == 1


def test_available_cores_is_the_affinity_mask():
    assert available_cores() == len(os.sched_getaffinity(0))


def test_explicit_setting_wins():
    assert explicit_threads({"OMP_NUM_THREADS": "3"}) == 3
    assert explicit_threads({"ATTRIBUTION_THREADS": "2", "OMP_NUM_THREADS": "1"}) == 2
    assert explicit_threads({"OMP_NUM_THREADS": "x"}) is None
    assert explicit_threads({}) is None


def test_configure_threads_sets_torch(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("ATTRIBUTION_THREADS", "1")
        assert configure_threads("test") == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_busy_elsewhere_sees_another_busy_process_but_not_our_own_work():
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        seen = busy_elsewhere(0.5)
    finally:
        spin.kill()
        spin.wait()
    assert seen >= 0.5  # one core spinning (plus whatever else runs on this machine)
    t0 = time.process_time()
    # our own busy loop in this process is not "elsewhere": compare with a quiet reading.  Other jobs on a
    # shared machine come and go between the two readings, so the closest of three pairs is compared
    import threading

    def reading_with_own_work() -> float:
        stop = threading.Event()

        def burn():
            while not stop.is_set():
                sum(range(1000))

        th = threading.Thread(target=burn)
        th.start()
        try:
            return busy_elsewhere(0.5)
        finally:
            stop.set()
            th.join()

    excess = min(reading_with_own_work() - busy_elsewhere(0.5) for _ in range(3))
    assert excess < 0.6 and time.process_time() > t0  # our own core's worth (1.0) would be counted otherwise


def test_the_cli_sets_the_threads_at_torch_import_not_before():
    """The CLI configured the threads by importing torch before every command (3-5 s before a typo was
    refused); now it waits for torch's first import and sets them right after it, before any torch work."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "ATTRIBUTION_THREADS")}
    plain = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=env,
                           capture_output=True, text=True, check=True)
    want = int(plain.stdout) + 1  # not torch's own default, so only the hook can have set it
    code = (
        "import sys\n"
        "from engine.threads import configure_threads_when_loaded\n"
        "configure_threads_when_loaded('test')\n"
        "import importlib.util\n"
        "assert importlib.util.find_spec('torch') is not None  # a probe, as libraries make: not the import\n"
        "assert 'torch' not in sys.modules\n"
        "import torch\n"
        "assert not [f for f in sys.meta_path if type(f).__name__ == '_AfterTorchImport']\n"
        f"sys.exit(0 if torch.get_num_threads() == {want} else 3)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env={**env, "ATTRIBUTION_THREADS": str(want)},
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
