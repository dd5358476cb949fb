"""The adapter store of a bundle (``bundle/adapters/``).

Each installed adapter is a directory ``adapters/<name>/`` holding the files the bundle's backends
load (``adapter.gguf``, ``adapter.onnx_adapter``) and ``manifest.json`` (base fingerprint, rank,
alpha, targets, provenance, every file's size and sha256). An install is validated in full, built
in a temporary directory (``adapters/.<name>.*``), fsynced and renamed into place: the rename is the
commit, so a crash never leaves a half adapter listed. Writers hold the store's lock
(``adapters/.lock``, flock), so two installs of one name are serialized and the second is refused
in one line; temporaries a killed writer left behind are removed when a store opens with no writer
active.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._io import atomic_dir, sha256_file
from .adapters import LoraAdapter
from .converters import genai, keys, load_adapter, onnx_fused, save_adapter
from .errors import CorruptFileError, EdgeloraError, SourceNotFoundError

ADAPTER_FILES = keys.ADAPTER_FILES
MANIFEST = "manifest.json"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # adapter names, here and on the service
MAX_ADAPTER_MB = 64.0
MAX_STORE_MB = 512.0
LOCK = ".lock"
LOCK_WAIT_S = 120.0
_STALE = re.compile(r"^\..+\.(tmp|old|removing)$")  # what atomic_dir and remove leave if killed


class StoreError(EdgeloraError):
    """An adapter store operation that cannot be done (bad name, over a size limit, missing)."""


@dataclass
class StoreLimits:
    max_adapter_mb: float = MAX_ADAPTER_MB
    max_store_mb: float = MAX_STORE_MB


class AdapterStore:
    def __init__(self, root: str | os.PathLike, *, fingerprint: str, config, backends: list[str],
                 limits: StoreLimits | None = None, genai_slots: dict | None = None, gguf_precision: str = "f32"):
        self.root = Path(root)
        self.gguf_precision = gguf_precision  # what llama.cpp computes with; adapter.gguf keeps the f32 value
        self.fingerprint = fingerprint
        self.config = config
        self.backends = backends
        # the LoRA slots (name -> type) of the bundle's CPU ONNX graph, which genai apps load adapters onto
        self.genai_slots = genai_slots
        self.limits = limits or StoreLimits()
        self.root.mkdir(parents=True, exist_ok=True)
        self._verified: dict[tuple[str, int, int], str] = {}  # file identity -> the sha256 it was checked against
        self._remove_stale()

    # -- the writers' lock --------------------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self, wait: float | None = LOCK_WAIT_S):
        """Holds the store's exclusive lock; yields False at once if `wait` is None and another
        process holds it, or if the store is read-only (nothing can be written then anyway)."""
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            yield True
            return
        try:
            fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            yield False
            return
        try:
            deadline = time.monotonic() + (wait or 0.0)
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if wait is None:
                        yield False
                        return
                    if time.monotonic() > deadline:
                        raise StoreError(f"another process has been changing the store {self.root} for over "
                                         f"{wait:g} s; try again when it finishes") from None
                    time.sleep(0.05)
            yield True
        finally:
            os.close(fd)  # releases the lock

    def _remove_stale(self) -> None:
        """Removes temporaries of killed writers (only when no writer is active, so none is live)."""
        with self._lock(wait=None) as held:
            if held:
                for p in self.root.iterdir():
                    if _STALE.match(p.name):
                        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    # -- reading ------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
                      and (p / MANIFEST).exists())

    def manifest(self, name: str) -> dict[str, Any]:
        path = self.root / name / MANIFEST
        if not NAME.match(name) or not path.exists():
            raise SourceNotFoundError(f"no adapter named {name!r} in {self.root} (installed: {', '.join(self.names()) or 'none'})")
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise CorruptFileError(f"{path}: not valid JSON ({e}); remove and reinstall the adapter") from e

    def list(self) -> list[dict[str, Any]]:
        return [self.manifest(n) for n in self.names()]

    def verify(self, name: str) -> dict[str, Any]:
        m = self.manifest(name)
        bad = []
        for rel, info in m["files"].items():
            p = self.root / name / rel
            if not p.exists():
                bad.append(f"{rel} is missing")
            elif sha256_file(p) != info["sha256"]:
                bad.append(f"{rel} has the wrong sha256")
        if bad:
            raise CorruptFileError(f"adapter {name}: {'; '.join(bad)}; remove and reinstall it")
        return m

    def open(self, name: str, backend: str) -> tuple[Path, LoraAdapter]:
        """An installed adapter for an engine: its file, checked against the sha256 recorded at install
        (read once per file identity: path, size, modification time), and the adapter read from it."""
        m, rel = self._file(name, backend)
        path, want = self.root / name / rel, m["files"][rel]["sha256"]
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if self._verified.get(key) != want:
            if sha256_file(path) != want:
                raise CorruptFileError(f"adapter {name}: {rel} has changed since it was installed "
                                       "(wrong sha256); remove and reinstall it")
            self._verified[key] = want
        return path, load_adapter(path, self.config)

    def path(self, name: str, backend: str, *, engine: bool = False) -> Path:
        """The adapter's file for `backend`: the f32 value, or with `engine` the one its engine loads."""
        return self.root / name / self._file(name, backend, engine)[1]

    def _genai_copy(self) -> bool:
        """Whether genai apps need a copy of each adapter in the graph's own layout."""
        return self.genai_slots is not None and not onnx_fused.per_module_f32(self.genai_slots)

    def _gguf_copy(self) -> bool:
        return "gguf" in self.backends and self.gguf_precision != "f32"

    def _file(self, name: str, backend: str, engine: bool = True) -> tuple[dict[str, Any], str]:
        """The adapter's manifest and the file name its `backend` loads (`engine`), or the one that
        holds its f32 value. An adapter installed before the bundle's GGUF precision changed has no
        copy in it: its f32 file serves (reinstall it for the speed)."""
        m = self.manifest(name)
        rel = ADAPTER_FILES[backend]
        low = keys.GGUF_ADAPTER_IN.format(precision=m.get("gguf_precision", "f32"))
        if engine and backend == "gguf" and low in m["files"]:
            rel = low
        if rel not in m["files"]:
            raise StoreError(f"adapter {name} has no {backend} file (it was installed for {', '.join(m['backends'])})")
        return m, rel

    # -- changing -----------------------------------------------------------------------------

    def check_name(self, name: str, replace: bool = False) -> None:
        """Refuses a name the store does not allow, or one already installed unless `replace`."""
        if not isinstance(name, str) or not NAME.match(name):
            raise StoreError(f"adapter name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-'")
        if (self.root / name).exists() and not replace:
            raise StoreError(f"an adapter named {name!r} is already installed; remove it first or pass replace")

    def install(self, source: str | os.PathLike | LoraAdapter, name: str, *, replace: bool = False) -> dict[str, Any]:
        """Validates `source` (a path in any adapter format, or a LoraAdapter) against the base and
        installs it under `name`. Adapters without a fingerprint (plain PEFT) are bound to this base."""
        self.check_name(name, replace)
        with self._lock():
            return self._install(source, name, replace)

    def _install(self, source: str | os.PathLike | LoraAdapter, name: str, replace: bool) -> dict[str, Any]:
        self.check_name(name, replace)  # again: another writer may have installed it while we waited
        target = self.root / name
        adapter = source if isinstance(source, LoraAdapter) else load_adapter(source, config=self.config)
        bound_here = adapter.base_fingerprint is None
        adapter.check_fits(self.config, self.fingerprint)
        adapter = dataclasses.replace(adapter, base_fingerprint=self.fingerprint, name=name)  # the caller's stays as it was
        if adapter.nbytes() / (1 << 20) > self.limits.max_adapter_mb:
            raise StoreError(f"adapter {name} is {adapter.nbytes() / (1 << 20):.1f} MB, over the limit of "
                             f"{self.limits.max_adapter_mb:g} MB per adapter")
        other = sum(f["size"] for m in self.list() if m["name"] != name for f in m["files"].values()) / (1 << 20)
        copies = len(self.backends) + self._genai_copy() + 0.5 * self._gguf_copy()
        expected = other + copies * adapter.nbytes() / (1 << 20)
        if expected > self.limits.max_store_mb:
            raise StoreError(f"installing {name} would grow the store to ~{expected:.1f} MB, over its limit of "
                             f"{self.limits.max_store_mb:g} MB; remove adapters first")
        with atomic_dir(target, replace=replace) as tmp:
            for backend in self.backends:
                save_adapter(adapter, tmp / ADAPTER_FILES[backend], "gguf" if backend == "gguf" else "onnx", self.config,
                             check=False)  # checked above
            if self._gguf_copy():  # the engine's copy in fewer bits
                save_adapter(adapter, tmp / keys.GGUF_ADAPTER_IN.format(precision=self.gguf_precision), "gguf",
                             self.config, check=False, precision=self.gguf_precision)
            genai_file = None
            if self._genai_copy():  # onnxruntime-genai needs the graph's own slot names and types
                genai_file = genai.write_adapter(adapter, tmp / keys.GENAI_ADAPTER, self.config, self.genai_slots).name
            elif self.genai_slots is not None:  # the per-module file is already in the graph's slot names
                genai_file = ADAPTER_FILES["onnx"]
            files = {p.relative_to(tmp).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
                     for p in sorted(tmp.rglob("*")) if p.is_file()}
            ranks = sorted(set(adapter.ranks.values()))
            manifest = {
                "name": name, "base_fingerprint": self.fingerprint, "bound_at_install": bound_here,
                "rank": ranks[0] if len(ranks) == 1 else ranks, "alpha": adapter.alpha, "rslora": adapter.use_rslora,
                "targets": adapter.target_kinds, "modules": len(adapter.tensors), "parameters": adapter.num_parameters(),
                "backends": self.backends, "genai": genai_file, "gguf_precision": self.gguf_precision if self._gguf_copy() else "f32", "files": files, "provenance": adapter.provenance,
                "installed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str), encoding="utf-8")
        return manifest

    def remove(self, name: str) -> None:
        with self._lock():
            self.manifest(name)  # raises if absent
            doomed = self.root / f".{name}.removing"
            shutil.rmtree(doomed, ignore_errors=True)
            os.replace(self.root / name, doomed)  # unlisted at once
            shutil.rmtree(doomed, ignore_errors=True)
