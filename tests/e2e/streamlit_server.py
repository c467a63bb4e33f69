"""Start and stop a Streamlit server for browser tests; screenshots. Used by conftest.py and the tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = Path(__file__).resolve().parent / "screenshots"
CHROMIUM = "/usr/bin/chromium"
# As measured in ../shared/STACK.md: what Debian's chromium needs headless in a container.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
]
VIEWPORT = {"width": 1280, "height": 1400}


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    stderr_path: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model_dir: Path | str, log_dir: Path, timeout_s: float = 90, app_args: tuple[str, ...] = ()) -> Server:
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               # One torch thread: on 2 shared cores a tiny model is many times slower with two
               # (threads spin-wait for each other while the browser and pytest need the CPU too).
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [
        sys.executable, "-m", "streamlit", "run", "app.py",
        "--server.headless", "true", "--server.address", "127.0.0.1", "--server.port", str(port),
        "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false",
        "--browser.serverAddress", "localhost",
        "--", "--model", str(model_dir), *app_args,
    ]
    stderr_path = log_dir / f"streamlit-{port}.stderr"
    with stderr_path.open("w") as err, (log_dir / f"streamlit-{port}.stdout").open("w") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=err)
    url = f"http://localhost:{port}"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"streamlit exited with {process.returncode}:\n{stderr_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2) as response:
                if response.status == 200:
                    return Server(url, process, stderr_path)
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise RuntimeError(f"streamlit did not answer /healthz within {timeout_s}s:\n{stderr_path.read_text()[-3000:]}")


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


def wait_idle(page) -> None:
    """Until the script run is over (the top-right "Running..." widget is gone): stale elements are gone too."""
    page.wait_for_function(
        """() => { const w = document.querySelector('[data-testid="stStatusWidget"]');
                   return !w || !w.innerText.toLowerCase().includes('running'); }"""
    )


def screenshot(page, name: str) -> Path:
    """A 1280x1400 PNG of the page once it is idle, in tests/e2e/screenshots/ (gitignored)."""
    wait_idle(page)
    SCREENSHOTS.mkdir(exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path
