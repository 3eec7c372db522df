"""A private CUDA MPS control daemon, so each worker process can run on its own share of the SMs.

MPS caps every kernel a client process launches (XLA's included) at `CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`, fixed for
the life of the process. The daemon here needs no root and changes no GPU setting (compute mode, clocks, MIG): its
pipe and log directories live under a temp dir, and clients find it through `client_env`. A daemon already
answering on the environment's (or the default) pipe directory is reused and left running.

The daemon starts MPS servers lazily, so a GPU that refuses MPS clients shows up only when the first worker
initialises CUDA; the runner must treat a worker that fails to start as "MPS unavailable" too.
"""

from __future__ import annotations

import atexit
import glob
import logging
import os
import shutil
import subprocess
import tempfile
import time

log = logging.getLogger(__name__)

BINARY = "nvidia-cuda-mps-control"
DEFAULT_PIPE_DIR = "/tmp/nvidia-mps"  # what CUDA clients use when CUDA_MPS_PIPE_DIRECTORY is unset
DEFAULT_LOG_DIR = "/var/log/nvidia-mps"
SM_PERCENT_ENV = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"  # a client's cap on the SMs its kernels use, in percent
_QUERY_TIMEOUT = 5.0  # a stale control pipe can leave the control client waiting for a reader


class MpsUnavailable(RuntimeError):
    """MPS cannot be used here; the message says why."""


def _control(binary: str, pipe_dir: str, log_dir: str, command: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": pipe_dir, "CUDA_MPS_LOG_DIRECTORY": log_dir}
    return subprocess.run([binary], input=command + "\n", env=env, capture_output=True, text=True, timeout=timeout)


def _responds(binary: str, pipe_dir: str, log_dir: str) -> bool:
    if not os.path.exists(os.path.join(pipe_dir, "control")):
        return False
    try:
        return _control(binary, pipe_dir, log_dir, "get_server_list", _QUERY_TIMEOUT).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _check_gpu() -> None:
    if glob.glob("/dev/nvidia[0-9]*"):
        return
    smi = shutil.which("nvidia-smi")
    if smi is None:
        raise MpsUnavailable("no NVIDIA GPU: no /dev/nvidia* device and no nvidia-smi")
    try:
        result = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=_QUERY_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise MpsUnavailable(f"no NVIDIA GPU: nvidia-smi -L failed: {e}") from e
    if result.returncode != 0 or "GPU" not in result.stdout:
        raise MpsUnavailable(f"no NVIDIA GPU: nvidia-smi -L exited {result.returncode}: "
                             f"{(result.stdout + result.stderr).strip()[:300]}")


def _tail(path: str, lines: int = 5) -> str:
    try:
        with open(path, errors="replace") as f:
            text = "".join(f.readlines()[-lines:]).strip()
    except OSError:
        return ""
    return f"; {os.path.basename(path)}: {text}" if text else ""


class MpsControl:
    pipe_dir: str
    log_dir: str
    owned: bool  # False when reusing a daemon that was already running

    def __init__(self, pipe_dir: str, log_dir: str, owned: bool, binary: str, temp_dir: str | None = None):
        self.pipe_dir, self.log_dir, self.owned = pipe_dir, log_dir, owned
        self._binary, self._temp_dir, self._stopped = binary, temp_dir, False

    @classmethod
    def start(cls, base_dir: str | None = None, timeout: float = 10.0) -> "MpsControl":
        """Starts a private daemon under `base_dir` (a new temp dir by default); raises MpsUnavailable."""
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        binary = shutil.which(BINARY)
        if binary is None:
            raise MpsUnavailable(f"{BINARY} not found on PATH")
        _check_gpu()
        shared_pipe = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", DEFAULT_PIPE_DIR)
        shared_log = os.environ.get("CUDA_MPS_LOG_DIRECTORY", DEFAULT_LOG_DIR)
        if _responds(binary, shared_pipe, shared_log):
            log.info("reusing the MPS daemon already running on %s", shared_pipe)
            return cls(shared_pipe, shared_log, False, binary)

        temp_dir = None
        if base_dir is None:
            base_dir = temp_dir = tempfile.mkdtemp(prefix="nexus-mps-")
        pipe_dir, log_dir = os.path.join(base_dir, "pipe"), os.path.join(base_dir, "log")
        if _responds(binary, pipe_dir, log_dir):
            return cls(pipe_dir, log_dir, False, binary)
        os.makedirs(pipe_dir, exist_ok=True)
        os.makedirs(log_dir, exist_ok=True)
        try:
            cls._launch(binary, pipe_dir, log_dir, timeout)
        except MpsUnavailable:
            if temp_dir is not None:
                shutil.rmtree(temp_dir, ignore_errors=True)
            raise
        control = cls(pipe_dir, log_dir, True, binary, temp_dir)
        atexit.register(control.stop)  # the daemon outlives this process otherwise
        log.info("started a private MPS daemon on %s", pipe_dir)
        return control

    @staticmethod
    def _launch(binary: str, pipe_dir: str, log_dir: str, timeout: float) -> None:
        env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": pipe_dir, "CUDA_MPS_LOG_DIRECTORY": log_dir}
        output = os.path.join(log_dir, "start.out")
        # Output goes to a file, not a pipe: the forked daemon could hold a pipe open and block the wait for EOF.
        with open(output, "w") as out:
            try:
                code = subprocess.run([binary, "-d"], env=env, stdin=subprocess.DEVNULL, stdout=out,
                                      stderr=subprocess.STDOUT, timeout=timeout).returncode
            except (OSError, subprocess.TimeoutExpired) as e:
                raise MpsUnavailable(f"could not run {BINARY} -d: {e}") from e
        details = _tail(output) + _tail(os.path.join(log_dir, "control.log"))
        if code != 0:
            raise MpsUnavailable(f"{BINARY} -d exited {code}{details}")
        deadline = time.monotonic() + timeout
        while not _responds(binary, pipe_dir, log_dir):
            if time.monotonic() > deadline:
                details = _tail(output) + _tail(os.path.join(log_dir, "control.log"))
                try:  # a daemon that came up too late must not be left behind
                    _control(binary, pipe_dir, log_dir, "quit", _QUERY_TIMEOUT)
                except (OSError, subprocess.TimeoutExpired):
                    pass
                raise MpsUnavailable(f"the MPS daemon did not answer on {pipe_dir} within {timeout:g}s{details}")
            time.sleep(0.05)

    def client_env(self, sm_percent: int | None) -> dict[str, str]:
        """Environment for a worker process: this daemon's directories and, unless None, its SM share (1..100).
        With None the variable is left out: drop any inherited CUDA_MPS_ACTIVE_THREAD_PERCENTAGE yourself."""
        env = {"CUDA_MPS_PIPE_DIRECTORY": self.pipe_dir, "CUDA_MPS_LOG_DIRECTORY": self.log_dir}
        if sm_percent is not None:
            if isinstance(sm_percent, bool) or not isinstance(sm_percent, int) or not 1 <= sm_percent <= 100:
                raise ValueError(f"sm_percent must be an int in 1..100 or None, got {sm_percent!r}")
            env[SM_PERCENT_ENV] = str(sm_percent)
        return env

    def alive(self) -> bool:
        return _responds(self._binary, self.pipe_dir, self.log_dir)

    def servers(self) -> list[int]:
        """PIDs of the daemon's MPS servers: non-empty once a client has connected, i.e. MPS is in effect."""
        result = _control(self._binary, self.pipe_dir, self.log_dir, "get_server_list", _QUERY_TIMEOUT)
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip()
            raise MpsUnavailable(f"get_server_list failed on {self.pipe_dir}: {output}")
        return [int(word) for word in result.stdout.split() if word.isdigit()]

    def stop(self) -> None:
        """Asks an owned daemon to quit (it exits once its clients are gone); a reused one is left running."""
        if not self.owned or self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        try:
            _control(self._binary, self.pipe_dir, self.log_dir, "quit", _QUERY_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as e:
            log.warning("could not send quit to the MPS daemon on %s: %s", self.pipe_dir, e)
            return
        deadline = time.monotonic() + _QUERY_TIMEOUT
        while self.alive():
            if time.monotonic() > deadline:
                log.warning("the MPS daemon on %s still answers after quit; leaving %s in place",
                            self.pipe_dir, self.pipe_dir)
                return
            time.sleep(0.05)
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)


def try_start_mps(base_dir: str | None = None, timeout: float = 10.0) -> MpsControl | None:
    """A started (or reused) daemon, or None after one warning saying why MPS cannot be used."""
    try:
        return MpsControl.start(base_dir, timeout)
    except MpsUnavailable as e:
        log.warning("CUDA MPS unavailable (%s); prefill and decode will share the GPU in one process", e)
        return None
