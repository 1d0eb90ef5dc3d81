"""Fixtures for the page's tests: a real ``lorafit ui`` server and a real headless Chromium.

With the network closed: where the kernel allows it (Linux, CAP_SYS_ADMIN, as in CI's
container), the module's fixtures run in a fresh network namespace that has nothing but a
loopback interface, so the server, its training processes, chromedriver and Chromium all start
with no route off this machine, and a page that waited on a CDN or a web font would show it.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import importlib.util
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
    # Should anything still try a name off this machine, fail at once instead of waiting on DNS.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
)
SERVER_START_S = 240  # importing gradio, torch and transformers on 2 busy cores


_CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1


@contextlib.contextmanager
def network_closed() -> Iterator[bool]:
    """Move this thread, and every process it starts, into a new network namespace (loopback
    only); yields whether that worked. The thread's own namespace is restored afterwards."""
    if not sys.platform.startswith("linux") or not Path("/proc/thread-self/ns/net").exists():
        yield False
        return
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if libc.unshare(_CLONE_NEWNET) != 0:  # EPERM without CAP_SYS_ADMIN
            yield False
            return
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # a new namespace's lo is down
                request = struct.pack("16sh", b"lo", 0)
                flags = struct.unpack("16sh", fcntl.ioctl(s, _SIOCGIFFLAGS, request))[1]
                fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sh", b"lo", flags | _IFF_UP))
            yield True
        finally:
            if libc.setns(own, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "could not return to the original network namespace")
    finally:
        os.close(own)


@dataclass
class Server:
    url: str
    runs: Path
    work: Path
    log: Path
    proc: subprocess.Popen
    offline: bool
    pause_at_steps: tuple[int, ...] = ()  # every run it starts pauses after these (LORAFIT_PAUSE_AT_STEP)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_serving(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"lorafit ui exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"lorafit ui did not serve {url} within {SERVER_START_S} s:\n{log.read_text()[-3000:]}")


def _end_runs(runs: Path) -> None:
    """Stop training processes the page started that are still going (a failed test's)."""
    import json

    for record in (runs / ".lorafit-ui").glob("*/process.json"):
        pid = json.loads(record.read_text()).get("pid")
        with contextlib.suppress(ProcessLookupError, PermissionError, TypeError):
            os.kill(pid, signal.SIGKILL)


def missing() -> list[str]:
    """What the browser tests need and this machine lacks, with how to install it."""
    needs = (
        ("chromium (apt-get install chromium)", CHROMIUM),
        ("chromedriver (apt-get install chromium-driver)", CHROMEDRIVER),
        ("selenium (pip install 'lorafit[test]')", importlib.util.find_spec("selenium")),
        ("gradio (pip install 'lorafit[ui]')", importlib.util.find_spec("gradio")),
    )
    return [name for name, present in needs if not present]


PAUSE_AT_STEPS = (2, 8)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    """``python -m lorafit ui`` on a free port, with its runs, cache and temp files under tmp."""
    if missing():
        pytest.skip(f"needs {', '.join(missing())}")
    work = tmp_path_factory.mktemp("ui")
    with network_closed() as offline:
        port = _free_port()
        log = work / "server.log"
        env = {
            **os.environ,
            # this checkout's lorafit, also for the training processes the page starts
            "PYTHONPATH": os.pathsep.join([str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])]),
            "LORAFIT_CACHE": str(work / "cache"),
            "GRADIO_TEMP_DIR": str(work / "gradio"),
            "OMP_NUM_THREADS": "1",  # tiny models: threads only contend with the browser
            # every run the page starts stops itself after these steps until the test sends
            # SIGCONT: Stop reaches it mid-way, and a resumed run is seen running, however fast
            # the machine (a run resumed after a step does not pause there)
            "LORAFIT_PAUSE_AT_STEP": ",".join(map(str, PAUSE_AT_STEPS)),
        }
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "lorafit", "ui", "--port", str(port), "--runs", str(work / "runs")],
                cwd=work,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        url = f"http://127.0.0.1:{port}/"
        try:
            _wait_until_serving(url, proc, log)
            yield Server(url, work / "runs", work, log, proc, offline, PAUSE_AT_STEPS)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            _end_runs(work / "runs")


@pytest.fixture(scope="module")
def browser(server: Server) -> Iterator[object]:
    """Headless Chromium driven by chromedriver, logging every request the page makes."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="lorafit-chromium-", dir=server.work)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    # Started from this thread, so in the server's network namespace too (see network_closed).
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
