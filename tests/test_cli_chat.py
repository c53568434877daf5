"""`pagedllm chat` in a real terminal (a pseudo-terminal): Ctrl-C stops a reply; Ctrl-C at the prompt quits."""

from __future__ import annotations

import os
import pty
import select
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CTRL_C = b"\x03"


class Terminal:
    """A child process on a pseudo-terminal: what a user types, and everything the child printed."""

    def __init__(self, *argv: str) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: a session leader whose controlling terminal is the pty
            os.chdir(ROOT)
            os.execve(sys.executable, [sys.executable, *argv], {**os.environ, "PYTHONPATH": str(ROOT)})
        self.output = b""
        self.exit_code: int | None = None

    def type(self, data: bytes) -> None:
        os.write(self.fd, data)

    def read_until(self, marker: bytes, start: int, timeout: float) -> int:
        """Read until ``marker`` appears at or after offset ``start``; returns the offset just past it."""
        deadline = time.monotonic() + timeout
        while (found := self.output.find(marker, start)) < 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {marker!r} within {timeout} s; output:\n{self.output[-2000:]!r}")
            if select.select([self.fd], [], [], min(remaining, 1.0))[0]:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:  # the child closed the terminal
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"the child exited before {marker!r}; output:\n{self.output[-2000:]!r}")
                self.output += chunk
        return found + len(marker)

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.exit_code = os.waitstatus_to_exitcode(status)
                return self.exit_code
            if select.select([self.fd], [], [], 0.2)[0]:
                try:
                    self.output += os.read(self.fd, 4096)
                except OSError:
                    pass
        os.kill(self.pid, 9)
        raise AssertionError(f"the chat did not exit; output:\n{self.output[-2000:]!r}")


@pytest.fixture
def chat() -> Terminal:
    term = Terminal("-m", "pagedllm.cli", "chat", "--device", "cpu", "--max-model-len", "1024",
                    "--max-tokens", "900", "--ignore-eos", "--cpu-kv-cache-gib", "0.1")
    yield term
    if term.exit_code is None:  # a failed test left it running
        os.kill(term.pid, 9)
        os.waitpid(term.pid, 0)
    os.close(term.fd)


def test_ctrl_c_stops_the_reply_the_next_turn_works_and_ctrl_c_at_the_prompt_quits(chat: Terminal) -> None:
    # One engine start for the whole conversation: start-up is most of the test's time.
    # (Ctrl-D at the prompt takes the same path as end of input, tests/test_cli.py's chat test.)
    pos = chat.read_until(b"> ", 0, timeout=240)
    for turn in (b"Tell me a long story.\n", b"And another one.\n"):
        chat.type(turn)
        pos = chat.read_until(turn.strip(), pos, timeout=30)  # the terminal's echo
        reply_start = pos
        pos = chat.read_until(b" ", pos + 40, timeout=120)  # some reply text has streamed
        chat.type(CTRL_C)
        pos = chat.read_until(b"[interrupted]", pos, timeout=60)
        pos = chat.read_until(b"> ", pos, timeout=30)  # back at the prompt long before 900 tokens
        assert b"Traceback" not in chat.output[reply_start:pos]
    chat.type(CTRL_C)
    assert chat.wait(timeout=60) == 0
    assert b"Traceback" not in chat.output
