"""Run a command with its stderr on a real pseudo-terminal, as a person at a shell would."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import termios
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path


def run_with_stderr_on_a_pty(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path | None = None,
    size: tuple[int, int] | None = None,
    timeout: float = 120,
) -> tuple[int, str, str]:
    """Run ``argv`` with stdout piped and stderr on a pty; return (status, stdout, terminal text).

    ``size`` is the terminal's (rows, columns); None leaves the pty reporting
    0x0, as some container and CI terminals do.
    """
    leader, follower = pty.openpty()
    if size is not None:
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", size[0], size[1], 0, 0))
    chunks: list[bytes] = []

    def drain() -> None:  # keep reading so the child never blocks on a full terminal buffer
        while True:
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: the child closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        try:
            process = subprocess.Popen(list(argv), cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL,
                                       stdout=subprocess.PIPE, stderr=follower)
        finally:
            os.close(follower)  # the child holds its own copy; EOF on the leader once it exits
        stdout, _ = process.communicate(timeout=timeout)
        reader.join(timeout=timeout)
    finally:
        os.close(leader)
    return process.returncode, stdout.decode(), b"".join(chunks).decode("utf-8", "replace")
