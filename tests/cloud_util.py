"""The adapter service as its own process (`edgelora cloud serve`), and chats to train on: shared by
the cloud tests of each runner."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

FACTS = [("What is my dog called?", "Your dog is called Biscuit."),
         ("Where do I live?", "You live in the quick brown fox town."),
         ("What do I drink?", "You drink green tea with lemon."),
         ("What is my job?", "You repair small boats.")]


def chats(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": FACTS[i % 4][0]},
                          {"role": "assistant", "content": FACTS[i % 4][1]}]} for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceProcess:
    """`edgelora cloud serve` in a child process."""

    def __init__(self, root: Path, bases: list[str], port: int | None = None, *extra: str, env: dict | None = None):
        self.root, self.bases, self.port, self.extra = root, bases, port or free_port(), extra
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc, self.env = None, env

    def start(self) -> "ServiceProcess":
        args = [sys.executable, "-m", "edgelora", "cloud", "serve", "--root", str(self.root), "--port", str(self.port),
                "--threads", "1", *self.extra]
        for b in self.bases:
            args += ["--base", b]
        self.log = open(self.root / "service.log", "a")
        env = {**os.environ, **self.env} if self.env else None
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, text=True, env=env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited: {(self.root / 'service.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/v1/health", timeout=1) as r:
                    self.health = json.loads(r.read())
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("service did not start")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)

    @property
    def public_key(self) -> str:
        return (self.root / "service_key.pub").read_text().strip()


class RayCluster:
    """A local Ray cluster of `cpus` CPUs (`ray start --head --block`) that outlives the services
    pointed at it; stopped with the process that holds it. It takes a token of its own (Ray's token
    authentication), which services get through `env` (RAY_AUTH_TOKEN_PATH), whatever ~/.ray holds."""

    def __init__(self, cpus: int = 2):
        import secrets
        import tempfile

        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.temp = Path(tempfile.mkdtemp(prefix="elray-", dir="/tmp"))  # short: Ray's socket paths must fit
        (self.temp / "token").write_text(secrets.token_hex(32))
        self.env = {"RAY_AUTH_TOKEN_PATH": str(self.temp / "token"), "RAY_USAGE_STATS_ENABLED": "0"}
        ray = Path(sys.executable).with_name("ray")
        self.log = open(self.temp / "head.log", "w")
        self.proc = subprocess.Popen([str(ray), "start", "--head", "--block", f"--port={self.port}", f"--num-cpus={cpus}",
                                      "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={self.temp}"],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, **self.env, "RAY_AUTH_MODE": "token"})
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start failed: {(self.temp / 'head.log').read_text()}")
            if "Ray runtime started" in (self.temp / "head.log").read_text():
                return
            time.sleep(0.2)
        raise RuntimeError("ray start did not finish in 120 s")

    def stop(self) -> None:
        import shutil

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        shutil.rmtree(self.temp, ignore_errors=True)
