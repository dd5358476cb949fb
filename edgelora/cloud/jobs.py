"""A job's work, wherever it runs: in a thread of the service or as a Ray task on another machine.

A job reads only its own directory, ``<jobs>/<id>/``::

    examples.jsonl         what the caller sent
    components/            for a composition: the library adapters it may mix (components.json names
                           them), copied in by the service when it queued the job

and writes there too::

    checkpoint...          the trainer's checkpoint: a retried or restarted job resumes from it
    progress.json          the last progress report of a job run outside the service's process
    attempts               how many times the work was started
    result/                adapter.gguf and result.json, written last and whole

It never reads the service's key nor writes its library: the service adds the result to the library
(once: the adapter's id follows from the job's) and alone signs what it serves. So the jobs directory
is all that workers on other machines need to share with the service.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from edgelora._io import atomic_dir, write_bytes_atomic
from edgelora.adapters import LoraAdapter
from edgelora.converters import keys, load_adapter, save_adapter
from edgelora.errors import EdgeloraError

from .compose import ComposeError, ExampleLoss, compose, search_weights, weights_from_description

RESULT, PROGRESS, ATTEMPTS, LOCK = "result", "progress.json", "attempts", ".run.lock"
ADAPTER = keys.ADAPTER_FILES["gguf"]  # the result's adapter, as the library keeps it
COMPONENTS = "components"
_TRAIN_KEYS = ("step", "steps", "loss", "eta_s")


class JobLockTimeout(EdgeloraError):
    """Another run of the same job still holds it."""


class Base:
    """A base a service serves and its jobs train against (a bundle's artifact or the float weights)."""

    def __init__(self, source: str):
        from edgelora.bundle import Bundle, open_source

        self.source = open_source(source)
        self.fingerprint, self.config = self.source.fingerprint, self.source.config
        self.tokenizer = self.source.tokenizer() if isinstance(self.source, Bundle) else self.source.tokenizer
        self.label = str(source)
        self._weights = None

    def weights(self):
        if self._weights is None:
            from edgelora.train import base_weights

            self._weights = base_weights(self.source)[1]
        return self._weights


def error_of(e: Exception) -> str:
    """What a job that raised `e` reports: an EdgeloraError's own line, anything else as a bug."""
    return str(e) if isinstance(e, EdgeloraError) else f"internal error: {type(e).__name__}: {e}"


def adapter_id(job_id: str) -> str:
    """The library id of a job's adapter: one job, one entry, however often its end is reported."""
    return hashlib.sha256(f"edgelora-job:{job_id}".encode()).hexdigest()[:16]


def has_result(jdir: Path) -> bool:
    return (jdir / RESULT / "result.json").exists()


def read_result(jdir: Path, job: dict, config) -> tuple[LoraAdapter, dict[str, Any]]:
    """The adapter a job made and what the library records of how (method, extra)."""
    adapter = load_adapter(jdir / RESULT / ADAPTER, config)
    adapter.base_fingerprint, adapter.name = job["base"], job["name"]
    return adapter, json.loads((jdir / RESULT / "result.json").read_text())


@contextmanager
def exclusive(jdir: Path, wait_s: float = 600.0) -> Iterator[int]:
    """Holds the job for one run and yields which attempt this is. A run of the same job still
    alive elsewhere (a service restarted while its old task is being stopped) is waited for, so two
    runs never write one checkpoint. The lock goes with the process that held it."""
    fd = os.open(jdir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise JobLockTimeout(f"job {jdir.name} is still held by another run after {wait_s:.0f}s; "
                                         f"stop it or remove {jdir / LOCK}") from None
                time.sleep(0.2)
        path = jdir / ATTEMPTS
        attempt = (int(path.read_text()) if path.exists() else 0) + 1
        write_bytes_atomic(path, str(attempt).encode())
        yield attempt
    finally:
        os.close(fd)


def execute(job: dict, jdir: Path, base: Base, *, threads: int | None, checkpoint_every: int,
            progress: Callable[[dict], None]) -> None:
    """Runs `job` to its result in `jdir` (nothing if it is there already) on `threads` BLAS threads
    (the same adapter, bit for bit, wherever it runs with as many). `progress` gets dicts with the
    attempt, the step or search evaluation, and `resumed_at_step` once when a later attempt continues
    from a checkpoint. Raises EdgeloraError for a job that cannot succeed."""
    from threadpoolctl import threadpool_limits

    with exclusive(jdir) as attempt, threadpool_limits(threads):
        if has_result(jdir):
            return
        first = True

        def report(info: dict) -> None:
            nonlocal first
            info = {"attempt": attempt, **info}
            if first and attempt > 1 and "step" in info:
                info["resumed_at_step"] = info["step"] - 1
            first = False
            progress(info)

        progress({"attempt": attempt})
        if job["kind"] == "examples":
            adapter, result = _train(job, jdir, base, threads, checkpoint_every, report)
        else:
            adapter, result = _compose(job, jdir, base, report)
        with atomic_dir(jdir / RESULT) as tmp:
            save_adapter(adapter, tmp / ADAPTER, "gguf", base.config)
            (tmp / "result.json").write_text(json.dumps(result))


def _train(job, jdir, base, threads, checkpoint_every, report) -> tuple[LoraAdapter, dict]:
    from edgelora.train import TrainConfig, train_adapter

    p = job["params"]
    cfg = TrainConfig(rank=p["rank"], alpha=2.0 * p["rank"], steps=p["steps"], lr=p["lr"], seq_len=p["seq_len"],
                      seed=p["seed"], checkpoint_every=checkpoint_every, threads=threads,
                      adaptive_threads=False,  # a job resumed or retried makes the very same adapter
                      val_fraction=0.1 if job["examples"] >= 10 else 0.0, eval_every=max(p["steps"] // 4, 1))
    r = train_adapter(base.source, jdir / "examples.jsonl", job["name"], config=cfg, checkpoint_dir=jdir,
                      resume=True, install=False, progress=lambda i: report({k: i[k] for k in _TRAIN_KEYS}))
    extra = {"train": {"steps": r.steps, "loss_first": r.losses[0], "loss_last": r.losses[-1],
                       "val_loss": r.val_losses[-1][1] if r.val_losses else None}}
    return r.adapter, {"method": "train", "extra": extra}


def _compose(job, jdir, base, report) -> tuple[LoraAdapter, dict]:
    """Weights by description alone, or searched on the examples' loss, over the job's components."""
    from edgelora.train.data import load as load_examples

    p = job["params"]
    entries = json.loads((jdir / COMPONENTS / "components.json").read_text())
    docs = [e["doc"] for e in entries]
    examples = load_examples(jdir / "examples.jsonl", base.tokenizer, p["seq_len"]) if job["examples"] else []
    adapters = []
    for e in entries:
        a = load_adapter(jdir / COMPONENTS / f"{e['id']}.gguf", base.config)
        a.base_fingerprint, a.name = job["base"], e["name"]
        adapters.append(a)
    info: dict[str, Any] = {}
    if not examples:
        weights = weights_from_description(job["description"], docs)
    else:
        start = None
        if job["description"]:
            try:
                start = weights_from_description(job["description"], docs)
            except ComposeError:
                pass
        loss = ExampleLoss(base.weights(), base.config, adapters, examples)
        res = search_weights(loss, len(adapters), start=start, budget=p["budget"], seed=p["seed"],
                             progress=lambda k, n, f: report({"evaluations": k, "budget": n, "objective": f}))
        weights = res.weights
        info = {"objective_start": res.start_loss, "objective": res.loss, "evaluations": res.evaluations,
                "loss": loss(weights)}
    composite = compose(adapters, weights)
    composite.base_fingerprint = base.fingerprint
    components = [{"id": e["id"], "name": e["name"], "weight": round(float(w), 6)}
                  for e, w in zip(entries, weights) if abs(w) >= 1e-3]
    return composite, {"method": "compose", "extra": {"components": components, "search": info}}


class ProgressFile:
    """A job's progress as a file in its directory (for runs outside the service's process), written
    at most every `every_s` seconds and at once for a new attempt."""

    def __init__(self, jdir: Path, every_s: float = 0.5, **worker):
        self.path, self.every_s, self.worker, self.last, self.pending = jdir / PROGRESS, every_s, worker, 0.0, None

    def __call__(self, info: dict) -> None:
        now = time.monotonic()
        self.pending = info
        if len(info) == 1 or "resumed_at_step" in info or now - self.last >= self.every_s:
            self.last = now
            self.flush()

    def flush(self) -> None:
        """Writes the last report if it is not written yet (at the end of a run)."""
        if self.pending is not None:
            write_bytes_atomic(self.path, json.dumps({**self.pending, "worker": self.worker, "time": time.time()}).encode())
            self.pending = None
