"""Gateway processes started by tests, as an operator would start them."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

import aiohttp

from tests.conftest import HS256_SECRET, WEBHOOK_SECRET

BASE_ENV_DROP = ("DATABASE_URL", "TEST_DATABASE_URL", "WEBHOOK_SECRETS", "AUTH_HS256_SECRET",
                 "AUTH_JWKS_URL", "LEGACY_WEBHOOK_SECRET", "BACKEND_URL", "PORT", "HOST",
                 "CORS_ALLOWED_ORIGINS", "AUTH_SESSION_COOKIE", "AUTH_AUTHORIZED_PARTIES",
                 "HTTP_MAX_REQUEST_LINE_BYTES", "HTTP_MAX_HEADER_FIELD_BYTES",
                 "HTTP_MAX_HEADER_BYTES")


# Every process started here carries this session's mark in its environment (and so do its
# children), so that what a test leaves running can be found and stopped.
SESSION_MARK = "SORAMI_TEST_SESSION"
SESSION_ID = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
STARTED: list[Proc] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# Processes started by tests create jobs freely; the tests of the per-user limits set them.
USER_LIMITS_OFF = {name: "0" for name in (
    "USER_MAX_ACTIVE_IMAGE_JOBS", "USER_MAX_ACTIVE_VIDEO_JOBS",
    "USER_MAX_IMAGE_JOBS_PER_HOUR", "USER_MAX_VIDEO_JOBS_PER_HOUR")}


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in BASE_ENV_DROP}
    env.update(USER_LIMITS_OFF)
    env.update(extra)
    return env


def serve_env(database_url: str, **extra: str) -> dict[str, str]:
    """The environment of a gateway on `database_url` that takes the tests' secrets."""
    return clean_env(DATABASE_URL=database_url, WEBHOOK_SECRETS=WEBHOOK_SECRET,
                     AUTH_HS256_SECRET=HS256_SECRET, **extra)


class Proc:
    """A gateway process whose stderr is collected as it comes."""

    def __init__(self, args: list[str], env: Mapping[str, str]) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "gateway", *args],
            env={**env, SESSION_MARK: SESSION_ID},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        STARTED.append(self)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stderr is not None
        for raw in self.popen.stderr:
            self.lines.append(raw.decode(errors="replace"))

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    async def wait_log(self, needle: str, count: int = 1, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while self.stderr.count(needle) < count:
            if time.monotonic() > deadline or self.popen.poll() is not None:
                raise TimeoutError(f"{needle!r} x{count} not logged: {self.stderr[-2000:]}")
            await asyncio.sleep(0.05)

    def stop(self, timeout: float = 30.0) -> tuple[int, str]:
        """SIGTERM, wait, return (exit code, all of stderr)."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        self._reader.join(timeout=5)
        if self.popen.stderr is not None:
            self.popen.stderr.close()
        return self.popen.returncode, self.stderr


def still_running() -> list[tuple[int, str]]:
    """(pid, command line) of every live process that this session started, children too."""
    found = []
    mark = f"{SESSION_MARK}={SESSION_ID}".encode()
    for entry in Path("/proc").glob("[0-9]*"):
        if int(entry.name) == os.getpid():
            continue
        try:
            if mark not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            status = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if status != "Z":
            found.append((int(entry.name), command))
    return found


def start(args: list[str], env: Mapping[str, str]) -> Proc:
    return Proc(args, env)


async def wait_ready(port: int, timeout: float = 10.0, path: str = "/readyz") -> float:
    """Seconds until GET path answers 200; raises TimeoutError after `timeout`."""
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        while time.monotonic() - started < timeout:
            try:
                async with session.get(f"http://127.0.0.1:{port}{path}") as resp:
                    if resp.status == 200:
                        return time.monotonic() - started
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{path} not ready within {timeout}s")
