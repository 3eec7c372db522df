"""MPS control on CPU: a fake nvidia-cuda-mps-control (and nvidia-smi) on PATH stands in for the real daemon."""

import glob
import logging
import os
import shutil
import stat

import pytest

from runner.workers import mps
from runner.workers.mps import MpsControl, MpsUnavailable, try_start_mps

# Behaves like the real control binary as far as MpsControl can see: `-d` creates the control pipe in
# CUDA_MPS_PIPE_DIRECTORY and returns; a client command fails without a daemon; `quit` removes the pipe.
FAKE_CONTROL = """#!/bin/sh
if [ "$1" = "-d" ]; then
  echo "-d" >> "$FAKE_MPS_CALLS"
  if [ -n "$FAKE_MPS_FAIL" ]; then echo "fake start failure" >&2; exit 3; fi
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  echo "control daemon started" >> "$CUDA_MPS_LOG_DIRECTORY/control.log"
  if [ -z "$FAKE_MPS_NO_PIPE" ]; then : > "$CUDA_MPS_PIPE_DIRECTORY/control"; fi
  exit 0
fi
if [ ! -e "$CUDA_MPS_PIPE_DIRECTORY/control" ]; then echo "Cannot find MPS control daemon process" >&2; exit 1; fi
read cmd
echo "$cmd" >> "$FAKE_MPS_CALLS"
if [ "$cmd" = "quit" ]; then rm -f "$CUDA_MPS_PIPE_DIRECTORY/control"; fi
if [ "$cmd" = "get_server_list" ]; then echo 4242; fi
exit 0
"""
FAKE_SMI = """#!/bin/sh
echo "GPU 0: Fake H100 (UUID: GPU-0)"
"""

needs_no_gpu = pytest.mark.skipif(bool(glob.glob("/dev/nvidia[0-9]*")) or shutil.which("nvidia-smi") is not None,
                                  reason="this machine has an NVIDIA GPU")


def _script(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """PATH holds only the fakes (plus the system tools the fake script needs); returns the calls log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _script(bin_dir / mps.BINARY, FAKE_CONTROL)
    _script(bin_dir / "nvidia-smi", FAKE_SMI)
    calls = tmp_path / "calls"
    calls.write_text("")
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setenv("FAKE_MPS_CALLS", str(calls))
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path / "no-daemon-here"))
    monkeypatch.delenv("FAKE_MPS_FAIL", raising=False)
    monkeypatch.delenv("FAKE_MPS_NO_PIPE", raising=False)
    return calls


def test_missing_binary_is_unavailable(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MpsUnavailable, match="not found on PATH"):
        MpsControl.start()
    with caplog.at_level(logging.WARNING, logger="runner.workers.mps"):
        assert try_start_mps() is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "not found on PATH" in warnings[0].getMessage()


@needs_no_gpu
def test_no_gpu_is_unavailable(fake, tmp_path):
    os.remove(tmp_path / "bin" / "nvidia-smi")
    with pytest.raises(MpsUnavailable, match="no NVIDIA GPU"):
        MpsControl.start()


def test_start_stop_owned_private_daemon(fake, tmp_path):
    base = tmp_path / "mps"
    control = MpsControl.start(str(base), timeout=5)
    assert control.owned and control.pipe_dir == str(base / "pipe") and control.log_dir == str(base / "log")
    assert os.path.exists(base / "pipe" / "control") and control.alive() and control.servers() == [4242]
    control.stop()
    assert not control.alive() and not os.path.exists(base / "pipe" / "control")
    control.stop()  # idempotent: no second quit
    assert fake.read_text().split().count("quit") == 1


def test_default_base_dir_is_a_temp_dir_removed_on_stop(fake):
    control = MpsControl.start(timeout=5)
    base = os.path.dirname(control.pipe_dir)
    assert control.owned and os.path.basename(base).startswith("nexus-mps-") and os.path.isdir(base)
    control.stop()
    assert not os.path.exists(base)


def test_reuses_running_daemon_without_owning_it(fake, tmp_path, monkeypatch):
    running = tmp_path / "running"
    running.mkdir()
    (running / "control").write_text("")
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(running))
    control = MpsControl.start(str(tmp_path / "mps"), timeout=5)
    assert not control.owned and control.pipe_dir == str(running)
    control.stop()
    assert (running / "control").exists() and "quit" not in fake.read_text()
    assert "-d" not in fake.read_text().split()


def test_start_failure_reports_exit_code_and_output(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_MPS_FAIL", "1")
    with pytest.raises(MpsUnavailable, match="exited 3.*fake start failure"):
        MpsControl.start(str(tmp_path / "mps"), timeout=5)


def test_daemon_that_never_answers_times_out_with_log(fake, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("FAKE_MPS_NO_PIPE", "1")
    with pytest.raises(MpsUnavailable, match="did not answer.*control daemon started"):
        MpsControl.start(str(tmp_path / "mps"), timeout=0.3)
    with caplog.at_level(logging.WARNING, logger="runner.workers.mps"):
        assert try_start_mps(str(tmp_path / "mps2"), timeout=0.3) is None
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_client_env(fake, tmp_path):
    control = MpsControl.start(str(tmp_path / "mps"), timeout=5)
    try:
        env = control.client_env(40)
        assert env == {"CUDA_MPS_PIPE_DIRECTORY": control.pipe_dir, "CUDA_MPS_LOG_DIRECTORY": control.log_dir,
                       "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "40"}
        assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in control.client_env(None)
        assert control.client_env(1)["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "1"
        assert control.client_env(100)["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "100"
        for bad in (0, 101, -5, 50.0, "50", True):
            with pytest.raises(ValueError, match="sm_percent"):
                control.client_env(bad)
    finally:
        control.stop()
