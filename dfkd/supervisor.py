"""Service subprocesses for `dfkd up`: prefixed logs, health waits, and a stop that leaves nothing behind."""
from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Callable, TextIO

from shared.errors import DfkdError
from dfkd.processes import die_with_parent


class ServiceFailed(DfkdError, RuntimeError):
    """A service exited early or never became healthy."""


class Child:
    """One service process in its own process group; every output line is printed as `name | line`."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], width: int = 7,
                 on_line: Callable[[str], None] | None = None, out: TextIO = sys.stdout) -> None:
        self.name, self.argv, self.env = name, argv, env
        self.prefix = f"{name:>{width}} | "
        self.on_line = on_line
        self.out = out
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        self.process: subprocess.Popen | None = None
        self._pump: threading.Thread | None = None

    def start(self) -> "Child":
        # Own session: Ctrl-C reaches only `up`, which stops the services in order (trainer first, Redis last).
        self.process = subprocess.Popen(self.argv, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True,
                                        preexec_fn=die_with_parent)
        self._pump = threading.Thread(target=self._pump_lines, name=f"log-{self.name}", daemon=True)
        self._pump.start()
        return self

    def _pump_lines(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            line = line.rstrip("\n")
            self.tail.append(line)
            print(self.prefix + line, file=self.out, flush=True)
            if self.on_line is not None:
                self.on_line(line)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def returncode(self) -> int | None:
        return self.process.poll() if self.process else None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait(self, timeout: float | None = None) -> int:
        assert self.process is not None
        code = self.process.wait(timeout)
        if self._pump is not None:
            self._pump.join(timeout=5)  # the last lines (a summary) come after the exit
        return code

    def stop(self, timeout_s: float) -> None:
        """SIGTERM to the whole group, SIGKILL after `timeout_s`; returns once every member is gone."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                print(f"{self.prefix}did not stop within {timeout_s:.0f}s; killing it", file=self.out, flush=True)
        # Also after a clean exit: workers the service forked may still hold the group.
        self._signal_group(signal.SIGKILL)
        self.process.wait()
        if self._pump is not None:
            self._pump.join(timeout=5)

    def _signal_group(self, sig: int) -> None:
        assert self.process is not None
        try:
            os.killpg(self.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def failure(self, what: str) -> ServiceFailed:
        last = "\n".join(self.tail) or "(no output)"
        return ServiceFailed(f"{self.name} {what} (exit code {self.returncode}); its last lines:\n{last}")


def wait_healthy(child: Child, url: str, timeout_s: float, headers: dict[str, str] | None = None) -> float:
    """Poll `url` until it answers 200; fail fast if the child exits. Returns the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if not child.alive:
            raise child.failure("exited while starting")
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2) as reply:
                if reply.status == 200:
                    return time.monotonic() - started
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass  # not listening yet, or not ready (503)
        time.sleep(0.25)
    raise ServiceFailed(f"{child.name} was not healthy at {url} within {timeout_s:.0f}s")
