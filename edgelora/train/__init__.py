"""On-device personalization: LoRA training in numpy against the exact weights the device runs.

    adapter = edgelora.train.train_adapter(bundle, "chats.jsonl", name="me", steps=100)

The frozen base is read from the bundle's own artifact (a GGUF file dequantized block by block, so
the adapter learns against the quantization error the device will see). The loop is AdamW with
gradient clipping, warm-up and a cosine schedule, gradient accumulation, a validation split and
early stopping; it is deterministic under a seed (with a fixed thread count: `adaptive_threads=False`)
and checkpoints atomically every N steps and every `checkpoint_seconds`, so a run killed mid-way
resumes (``resume=True``) to the very adapter an uninterrupted run makes. A checkpoint records what defines its run (the settings, the data's and the
base's hashes); resuming with any of them changed is refused, naming what differs.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, NamedTuple

import numpy as np

from edgelora.adapters import LoraAdapter, LoraTensor

from . import data as _data
from .model import AdamW, LoraParams, LoraSpec, TrainerError, Workspace, loss_and_grads, masked_loss

CHECKPOINT = "checkpoint.npz"


@dataclass
class TrainConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    steps: int = 100
    lr: float = 1e-3
    warmup: int = 10
    weight_decay: float = 0.0
    grad_accum: int = 1
    clip: float = 1.0
    seq_len: int = 256
    last_layers: int | None = None
    val_fraction: float = 0.1
    eval_every: int = 25
    patience: int = 0  # evaluations without improvement before stopping (0: never stop early)
    checkpoint_every: int = 25
    checkpoint_seconds: float = 30.0  # also checkpoint when this long has passed since the last one (0: off)
    seed: int = 0
    threads: int | None = None  # BLAS threads at most (default: the library's)
    adaptive_threads: bool = True  # fewer threads while other processes keep cores busy (CoreGovernor);
    # off: a fixed count, for bitwise-reproducible runs
    backend: str | None = None  # which bundle artifact to train against: "gguf" or "onnx" (default: gguf if present)
    memory_mb: float | None = None  # the trainer's memory cap (default: the device profile's memory budget)
    expanded_layers: int | None = None  # float32 layers kept expanded (default: all if memory_mb allows, else 2)

    def __post_init__(self) -> None:
        if self.rank < 1 or self.steps < 1 or self.grad_accum < 1 or self.seq_len < 2 or self.checkpoint_every < 1:
            raise TrainerError("rank, steps, grad_accum, checkpoint_every must be >= 1 and seq_len >= 2")
        for f in ("lr", "alpha", "weight_decay", "clip", "checkpoint_seconds"):
            v = getattr(self, f)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise TrainerError(f"{f} must be a finite number >= 0, not {v!r}")
        if not 0 <= self.val_fraction < 1:  # also refuses NaN
            raise TrainerError("val_fraction must be in [0, 1)")
        self.targets = tuple(self.targets)

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to 10% of lr."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        t = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


@dataclass
class TrainResult:
    adapter: LoraAdapter
    losses: list[float] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    tokens: int = 0
    stopped_early: bool = False

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")


def base_weights(source, cfg: "TrainConfig | None" = None) -> tuple[object, Mapping[str, np.ndarray], str]:
    """(config, weights, fingerprint) of what the device runs: a bundle's artifact (`cfg.backend`;
    GGUF preferred, else the fused ONNX graph) held compact with as many layers expanded as the
    memory cap allows (`cfg.memory_mb`, by default the profile's budget; all of them: expanded once
    for good), or a BaseModel's weights as float32."""
    from dataclasses import replace

    from edgelora.base import BaseModel
    from edgelora.bundle import Bundle

    if isinstance(source, Bundle):
        from .weights import for_bundle

        cfg = cfg or TrainConfig()
        if cfg.memory_mb is None:
            cfg = replace(cfg, memory_mb=float(source.profile.memory_budget_mb))
        weights, _ = for_bundle(source, cfg.backend)
        plan = plan_memory(weights, cfg, source.config)
        weights.keep_layers = plan.layers
        if plan.layers >= source.config.num_layers:
            weights.materialize(tables=plan.tables)
        return source.config, weights, source.fingerprint
    if isinstance(source, BaseModel):
        weights = {name: np.ascontiguousarray(source.weights[name], np.float32) for name in source.weights}
        return source.config, weights, source.fingerprint
    raise TrainerError("train against a Bundle or a BaseModel")


def activation_mb(config, seq_len: int, layers: int | None = None) -> float:
    """An estimate of what one step keeps for the backward pass (the matmul outputs of each trained
    layer) plus one layer's recomputed attention probabilities and the LM head's working set."""
    c, t = config, seq_len
    per_layer = t * (3 * c.hidden_size + 2 * c.q_dim + 2 * c.kv_dim + 3 * c.intermediate_size)
    work = c.num_heads * t * t + 256 * t * 2 + t * c.vocab_size // 8
    return 4 * (per_layer * (layers or c.num_layers) + work) / 2**20


class MemoryPlan(NamedTuple):
    layers: int  # float32 layers kept expanded
    tables: bool  # the embedding and LM head expanded too (else read from their blocks)


def plan_memory(weights, cfg: "TrainConfig", config) -> MemoryPlan:
    """How many float32 layers to keep expanded: `cfg.expanded_layers` if given, else all of them
    when they fit in `cfg.memory_mb`, else 2. Nothing in between: a step runs the layers up and then
    down, so k kept layers spare about 2k of its 2L expansions, a saving linear in the memory spent.
    On a Llama-3.2-1B shape, 8 layers of 16 kept (1.46 GB more) saved 4% of a step against 2, and
    all 16 saved 11% (`edgelora` at 2 threads, 256 tokens: 13.0 and 12.0 s against 12.0-16.4 s).
    The float tables come last: only beside every layer, and only if they fit too."""
    L = config.num_layers
    if cfg.expanded_layers:
        return MemoryPlan(max(1, min(cfg.expanded_layers, L)), False)
    if not cfg.memory_mb or not hasattr(weights, "nbytes"):
        return MemoryPlan(2, False)
    left = _spare_mb(weights, cfg, config) - L * _layer_mb(config)
    if left < 0:
        return MemoryPlan(2, False)
    return MemoryPlan(L, left >= getattr(weights, "tables_nbytes", 0) / 2**20)


def _layer_mb(config) -> float:
    """One layer's linears as float32."""
    from .weights import LINEARS

    shapes = config.shapes()
    return 4 * sum(np.prod(shapes[f"layers.0.{m}"]) for m in LINEARS if f"layers.0.{m}" in shapes) / 2**20


def _spare_mb(weights, cfg: "TrainConfig", config) -> float:
    """What the memory cap leaves for expanded weights: less the compact weights, the activations
    and 200 MB for the interpreter, tokenizer and optimizer."""
    return cfg.memory_mb - weights.nbytes / 2**20 - activation_mb(config, cfg.seq_len, cfg.last_layers) - 200


def to_adapter(lora: LoraParams, cfg: TrainConfig, fingerprint: str, name: str, provenance: dict) -> LoraAdapter:
    tensors = {}
    for view_name, arr in lora.views.items():
        target, ab = view_name.rsplit(".", 1)
        tensors.setdefault(target, {})[ab] = arr.copy()
    return LoraAdapter({t: LoraTensor(v["A"], v["B"], cfg.alpha) for t, v in tensors.items()},
                       base_fingerprint=fingerprint, name=name, provenance=provenance)


def split(examples: list, cfg: TrainConfig) -> tuple[list, list, np.random.Generator]:
    """(train, validation, the loop's generator): a seeded shuffle, `cfg.val_fraction` held out."""
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(examples))
    n_val = int(round(len(examples) * cfg.val_fraction)) if len(examples) > 1 else 0
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]], rng


# Settings that do not change the adapter a run makes: a resumed run may change them.
RUN_FREE = ("threads", "adaptive_threads", "memory_mb", "expanded_layers", "checkpoint_every", "checkpoint_seconds")


def run_identity(cfg: TrainConfig, data_sha256: str, fingerprint: str) -> dict:
    """What a checkpoint must match to be resumed: the settings that shape the run, the data, the base."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in RUN_FREE}
    settings["targets"] = list(settings["targets"])
    return {"settings": settings, "data_sha256": data_sha256, "base_fingerprint": fingerprint}


@dataclass
class TrainState:
    """Everything a run needs to continue: parameters, optimizer moments, the data generator, history,
    and the identity of the run (`run_identity`) that a checkpoint must match to be resumed."""
    lora: LoraParams
    opt: AdamW
    rng: np.random.Generator
    step: int = 0
    losses: list[float] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    best: tuple[float, int] = (float("inf"), 0)
    identity: dict = field(default_factory=dict)

    def save(self, path: Path) -> None:
        """Atomically (a killed run keeps its previous checkpoint)."""
        from edgelora._io import atomic_file

        state = {"step": self.step, "rng": self.rng.bit_generator.state, "losses": self.losses, "val": self.val_losses,
                 "best": list(self.best), "adam_step": self.opt.step_count, "identity": self.identity}
        opt = self.opt
        with atomic_file(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, flat=self.lora.flat, m=opt.m if opt.m is not None else np.zeros(0, np.float32),
                     v=opt.v if opt.v is not None else np.zeros(0, np.float32), state=np.array(json.dumps(state)))

    def restore(self, path: Path) -> None:
        """Continues from `path`, refusing a checkpoint of another run (settings, data or base)."""
        try:
            with np.load(path) as z:
                state = json.loads(str(z["state"]))
                flat, m, v = z["flat"], z["m"], z["v"]
        except Exception as e:  # a truncated or foreign file: numpy/zipfile raise many kinds
            raise TrainerError(f"{path}: not a readable checkpoint ({e}); delete it to start over") from None
        self._check_identity(path, state.get("identity", {}))
        if flat.shape != self.lora.flat.shape:
            raise TrainerError(f"{path}: the checkpoint holds {flat.size} parameters, this run has "
                               f"{self.lora.flat.size}; delete it to start over")
        self.lora.flat[:] = flat
        if m.size:
            self.opt.m, self.opt.v = m.copy(), v.copy()
        self.opt.step_count = state["adam_step"]
        self.step, self.losses = state["step"], state["losses"]
        self.val_losses, self.best = [tuple(x) for x in state["val"]], tuple(state["best"])
        self.rng.bit_generator.state = state["rng"]

    def _check_identity(self, path: Path, saved: dict) -> None:
        mine = self.identity
        if saved == mine:
            return
        diffs = []
        if saved.get("base_fingerprint") != mine.get("base_fingerprint"):
            diffs.append("the base model")
        if saved.get("data_sha256") != mine.get("data_sha256"):
            diffs.append("the data (its sha256)")
        old, new = saved.get("settings", {}), mine.get("settings", {})
        diffs += [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        raise TrainerError(f"{path} is a checkpoint of another run (changed: {', '.join(diffs) or 'unknown'}); resume "
                           "with the same settings, or delete the checkpoint to start over")


def random_batches(examples: list, rng: np.random.Generator) -> Iterator:
    """One example at a time, drawn with replacement (the state's generator: resumable)."""
    while True:
        yield examples[int(rng.integers(len(examples)))]


def train_loop(state: TrainState, cfg: TrainConfig, loss_and_grad: Callable, batches: Iterator,
               evaluate: Callable[[], float] | None = None, checkpoint: Path | None = None,
               progress: Callable[[dict], None] | None = None) -> tuple[int, bool]:
    """The optimization loop over `state` up to `cfg.steps` (as mlx-lm's trainer, the loss and the
    batches come from the caller): `loss_and_grad(example) -> (loss, flat gradient, tokens)`,
    gradient accumulation, clipping, the warm-up/cosine schedule, evaluation with early stopping
    (the best parameters are restored), checkpoints. Returns (tokens seen, stopped early)."""
    lora, opt = state.lora, state.opt
    best_flat = lora.flat.copy()
    t0, tokens, stopped, start = time.monotonic(), 0, False, state.step
    saved_at = t0
    for step in range(start, cfg.steps):
        grad = np.zeros_like(lora.flat)
        step_loss = 0.0
        for _ in range(cfg.grad_accum):
            loss, g, n = loss_and_grad(next(batches))
            grad += g
            step_loss += loss
            tokens += n
        grad /= cfg.grad_accum
        norm = float(np.sqrt(np.dot(grad, grad)))
        if cfg.clip and norm > cfg.clip:
            grad *= cfg.clip / norm
        opt.lr = cfg.lr_at(step)
        opt.step(lora.flat, grad)
        state.losses.append(step_loss / cfg.grad_accum)
        state.step = done = step + 1
        if evaluate is not None and (done % cfg.eval_every == 0 or done == cfg.steps):
            v = evaluate()
            state.val_losses.append((done, v))
            if v < state.best[0]:
                state.best = (v, done)
                best_flat = lora.flat.copy()
            elif cfg.patience and (done - state.best[1]) >= cfg.patience * cfg.eval_every:
                stopped = True
        due = cfg.checkpoint_seconds and time.monotonic() - saved_at >= cfg.checkpoint_seconds
        if checkpoint and (done % cfg.checkpoint_every == 0 or done == cfg.steps or stopped or due):
            state.save(checkpoint)
            saved_at = time.monotonic()
        if progress:
            elapsed = time.monotonic() - t0
            progress({"step": done, "steps": cfg.steps, "loss": state.losses[-1], "lr": opt.lr,
                      "tokens_per_s": tokens / elapsed if elapsed else 0.0,
                      "eta_s": elapsed / max(done - start, 1) * (cfg.steps - done),
                      "val_loss": state.val_losses[-1][1] if state.val_losses else None})
        if stopped:
            lora.flat[:] = best_flat
            break
    return tokens, stopped


class CoreGovernor:
    """BLAS threads that follow the cores other processes leave free. A BLAS call split over threads
    waits for its slowest part, so a thread that shares its core with another program stalls every
    matmul for a scheduler slice: on this machine, 2 threads with both cores loaded trained at a
    fraction of 1 thread's speed (`bench/train.py --load`). Every `every_s` it reads the machine's busy
    CPU time (/proc/stat) less this process's own, and sets the thread count to the cores left free
    (at least 1, at most `max_threads`). Where /proc/stat is missing it keeps `max_threads`. OpenBLAS
    blocks a matmul differently for another thread count, so results then differ in the last bits:
    a run is bitwise reproducible (and resumes to the very adapter) with fixed threads only."""

    def __init__(self, max_threads: int, every_s: float = 5.0):
        self.max_threads, self.every_s = max_threads, every_s
        self.ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.threads = max_threads
        self._last = self._sample()
        if self._last is not None and max_threads > 1:
            time.sleep(0.2)  # the first reading, before this process adds any load
            self._update()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        """(wall, the machine's busy CPU seconds, this process's CPU seconds)."""
        try:
            with open("/proc/stat") as f:
                fields = [float(x) for x in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields
        own = os.times()
        return time.monotonic(), (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), \
            own.user + own.system

    def _update(self) -> None:
        from threadpoolctl import threadpool_limits

        now = self._sample()
        if now is None or self._last is None or now[0] - self._last[0] <= 0:
            return
        others = max(0.0, (now[1] - self._last[1]) - (now[2] - self._last[2])) / (now[0] - self._last[0])
        threads = max(1, min(self.max_threads, int(self.ncpu - others + 0.25)))
        if threads != self.threads:
            threadpool_limits(threads)
            self.threads = threads
        self._last = now

    def tick(self) -> None:
        if self.max_threads > 1 and self._last is not None and time.monotonic() - self._last[0] >= self.every_s:
            self._update()


def train_adapter(source, data: str | os.PathLike, name: str = "personal", *, config: TrainConfig | None = None,
                  checkpoint_dir: str | os.PathLike | None = None, resume: bool = False, install: bool = True,
                  replace: bool = False, progress: Callable[[dict], None] | None = None, **overrides) -> TrainResult:
    """Trains a LoRA adapter on `data` against `source` (a Bundle or BaseModel); with a Bundle and
    `install`, the adapter lands in the bundle's store, usable at once by its engines. The name is
    checked before any work: one the store refuses, or one installed already unless `replace`, is an
    error. BLAS threads are limited to `cfg.threads` for the run (fewer while other programs keep cores
    busy, unless `adaptive_threads` is off) and restored after it."""
    from contextlib import nullcontext

    from threadpoolctl import threadpool_limits

    from edgelora.bundle import Bundle

    cfg = config or TrainConfig(**overrides)
    if isinstance(source, Bundle) and install:
        source.store.check_name(name, replace)
    with threadpool_limits(cfg.threads) if cfg.threads else nullcontext():
        governor = CoreGovernor(cfg.threads) if cfg.threads and cfg.adaptive_threads else None
        return _train(source, data, name, cfg, checkpoint_dir, resume, install, progress, governor)


def _train(source, data, name: str, cfg: TrainConfig, checkpoint_dir, resume: bool, install: bool,
           progress, governor: CoreGovernor | None = None) -> TrainResult:
    from edgelora.bundle import Bundle

    tokenizer = source.tokenizer() if isinstance(source, Bundle) else source.tokenizer
    train, val, rng = split(_data.load(data, tokenizer, cfg.seq_len), cfg)  # bad data fails before the base is read
    data_sha = _sha(data)
    model_config, weights, fingerprint = base_weights(source, cfg)
    lora = LoraParams(model_config, LoraSpec(cfg.rank, cfg.alpha, tuple(cfg.targets))).init_random(
        np.random.default_rng(cfg.seed + 1))
    state = TrainState(lora, AdamW(lr=cfg.lr, weight_decay=cfg.weight_decay), rng,
                       identity=run_identity(cfg, data_sha, fingerprint))
    ckpt = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir else None
    if resume and ckpt and ckpt.exists():
        state.restore(ckpt)
    start = state.step
    ws = Workspace()

    def loss_and_grad(ex):
        if governor is not None:
            governor.tick()
        loss, g = loss_and_grads(weights, lora, ex.tokens[None], ex.mask[None], model_config,
                                 train_last=cfg.last_layers, workspace=ws)
        return loss, g, len(ex.tokens)

    def evaluate() -> float:
        return sum(masked_loss(weights, lora, ex.tokens[None], ex.mask[None], model_config, workspace=ws)
                   for ex in val) / len(val)

    t0 = time.monotonic()

    def report(p: dict) -> None:  # the progress, with the thread count the governor chose
        progress({**p, "threads": governor.threads} if governor is not None else p)

    tokens, stopped = train_loop(state, cfg, loss_and_grad, random_batches(train, rng), evaluate if val else None,
                                 ckpt, report if progress else None)
    provenance = {"method": "edgelora.train", "data_sha256": data_sha, "config": asdict(cfg),
                  "trained": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    adapter = to_adapter(lora, cfg, fingerprint, name, provenance)
    if isinstance(source, Bundle) and install:
        source.store.install(adapter, name, replace=True)
    return TrainResult(adapter, state.losses, state.val_losses, state.step if cfg.steps > start else start,
                       time.monotonic() - t0, tokens, stopped)


def _sha(path) -> str:
    from edgelora._io import sha256_file

    return sha256_file(path)


__all__ = ["TrainConfig", "TrainResult", "TrainerError", "train_adapter"]
