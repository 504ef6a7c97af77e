"""Two processes on one run: the run lock makes each sample predicted exactly once."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

from sparse_jax.pipeline.run_lock import LOCK_FILE, run_lock
from tests.test_pipeline_common import REPO, config_of, read_jsonl, write_gin


def test_second_holder_waits_and_says_so(tmp_path, caplog):
    events = []
    with caplog.at_level(logging.WARNING, logger="sparse_jax.pipeline.run_lock"):
        with run_lock(tmp_path):
            owner = json.loads((tmp_path / LOCK_FILE).read_text())
            assert owner["pid"] == os.getpid()

            def second():
                with run_lock(tmp_path, poll_seconds=0.05):
                    events.append("second holds")

            thread = threading.Thread(target=second)
            thread.start()
            deadline = time.time() + 10
            while "is being run by" not in caplog.text and time.time() < deadline:
                time.sleep(0.05)
            events.append("first releases")
        thread.join(timeout=10)
    assert events == ["first releases", "second holds"]
    assert caplog.text.count("is being run by") == 1 and f"pid {os.getpid()}" in caplog.text
    assert not (tmp_path / LOCK_FILE).exists()


def test_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    owner = {"host": socket.gethostname(), "pid": int(dead.stdout), "token": "old"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(owner))
    start = time.time()
    with run_lock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert time.time() - start < 5


def test_lock_without_heartbeat_is_taken_over_after_the_timeout(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "old"}))
    old = time.time() - 60
    os.utime(tmp_path / LOCK_FILE, (old, old))
    with run_lock(tmp_path, stale_seconds=30):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["host"] != "elsewhere"


def test_heartbeat_keeps_a_long_run_fresh(tmp_path):
    with run_lock(tmp_path, heartbeat_seconds=0.05):
        first = (tmp_path / LOCK_FILE).stat().st_mtime
        time.sleep(0.5)
        assert (tmp_path / LOCK_FILE).stat().st_mtime > first


@pytest.mark.slow  # two fresh processes load and compile the model: minutes on a shared 2-core CPU
def test_two_processes_on_one_run_predict_each_sample_once(tmp_path):
    gin_file = write_gin(tmp_path / "run.gin", tmp_path / "results", "ExperimentConfig.samples = 3\n")
    env = os.environ | {"PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "sparse_jax.cli", "run", f"--gin_file={gin_file}"]
    procs = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=900) for p in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    run_dir = config_of(gin_file).run_dir()
    indices = Counter(p["index"] for p in read_jsonl(run_dir / "predictions.jsonl"))
    assert indices == {0: 1, 1: 1, 2: 1}
    assert (run_dir / "run.json").exists() and not (run_dir / LOCK_FILE).exists()
    waited = [err for _, err in outputs if "is being run by" in err]
    assert len(waited) <= 1
    print(f"processes that waited for the lock: {len(waited)}")
