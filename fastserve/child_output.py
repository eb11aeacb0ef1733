"""What `fastserve up`'s children print: relayed line by line to our stderr, held back while
the demo streams (so logs never land inside its text), and remembered so that a child's
fatal reason can be repeated as `up`'s last line."""

from __future__ import annotations

import collections
import re
import sys
import threading
from typing import IO

# the line of a Python traceback that says what went wrong: "ValueError: model_type 'gpt2' is not 'opt'"
EXCEPTION_LINE = re.compile(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception|Exit)|AssertionError): (.+)$")
ARGPARSE_LINE = re.compile(r"^fastserve [\w-]+: error: (.+)$")


class Relay:
    """One relay for all children; `hold()` buffers their lines until `release()`."""

    def __init__(self, out: IO[str] | None = None) -> None:
        self.out = out or sys.stderr
        self.lock = threading.Lock()
        self.held: list[str] | None = None
        self.tails: dict[str, collections.deque[str]] = {}
        self.threads: dict[str, threading.Thread] = {}

    def follow(self, name: str, pipe: IO[bytes]) -> None:
        """Relays `pipe` (a child's merged stdout + stderr) on a daemon thread."""
        tail: collections.deque[str] = collections.deque(maxlen=200)
        self.tails[name] = tail
        thread = threading.Thread(target=self._pump, args=(pipe, tail), name=f"relay-{name}", daemon=True)
        self.threads[name] = thread
        thread.start()

    def _pump(self, pipe: IO[bytes], tail: collections.deque[str]) -> None:
        for raw in iter(pipe.readline, b""):
            line = raw.decode("utf-8", errors="replace")
            tail.append(line.rstrip("\n"))
            with self.lock:
                if self.held is not None:
                    self.held.append(line)
                else:
                    self.out.write(line)
                    self.out.flush()
        pipe.close()

    def hold(self) -> None:
        with self.lock:
            self.held = []

    def release(self) -> None:
        with self.lock:
            lines, self.held = self.held or [], None
            self.out.writelines(lines)
            self.out.flush()

    def fatal_reason(self, name: str) -> str | None:
        """The last exception message (or flag error) a dead child printed, if any."""
        if name in self.threads:
            self.threads[name].join(timeout=2)  # the rest of what it printed
        reason, ignored = None, False
        for line in self.tails.get(name, ()):
            if line.startswith("Exception ignored"):  # noise from interpreter shutdown, not the cause
                ignored = True
                continue
            match = EXCEPTION_LINE.match(line) or ARGPARSE_LINE.match(line)
            if match:
                if not ignored:
                    reason = match.group(match.lastindex)
                ignored = False  # an ignored traceback ends at its exception line
        return reason
