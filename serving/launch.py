"""Start `serving/serve.py` in the serving environment and wait until vLLM's server answers (standard library only,
so the tests and the benchmark use it from the project's environment)."""

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: The serving environment's interpreter (`make install-serve`; the Makefile passes its SERVE_VENV's here)
SERVE_PYTHON = Path(os.environ.get("ASTREA_SERVE_PYTHON", REPO / ".venv-serve" / "bin" / "python"))
READY = "Application startup complete."


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running_server(model: str | Path, *vllm_args: str, timeout: float = 420, log: Path | None = None):
    """Yields (url, what the launcher printed so far); stops the server (its whole process group) on exit. serve.py
    keeps vLLM's messaging on the loopback and its caches in a temporary folder."""
    log = log or Path(tempfile.mkdtemp(prefix="astrea-serve-log-")) / "server.log"
    port = free_port()
    command = [str(SERVE_PYTHON), str(REPO / "serving" / "serve.py"), "--model", str(model), "--port", str(port)]
    with open(log, "w") as sink:
        process = subprocess.Popen(
            [*command, "--", *vllm_args],
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    try:
        while READY not in log.read_text():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the vLLM server did not start (log: {log}):\n{log.read_text()[-4000:]}")
            time.sleep(2)
        yield f"http://127.0.0.1:{port}", log.read_text()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
