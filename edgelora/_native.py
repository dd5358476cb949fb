"""Keeping native libraries (llama.cpp, ONNX Runtime) quiet: their logs go to the process's
stdout/stderr file descriptors, below Python's sys.stdout."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator


@contextlib.contextmanager
def quiet_native(enabled: bool = True) -> Iterator[None]:
    """Sends fds 1 and 2 to /dev/null while native code runs (Python's own streams are flushed first)."""
    if not enabled or os.environ.get("EDGELORA_NATIVE_LOGS"):
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)
