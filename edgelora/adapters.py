"""`LoraAdapter`: one LoRA adapter as a plain value. Every format converts to and from it.

For each target module (canonical name, e.g. ``layers.3.q``) it holds A (r x in), B (out x r) and
alpha; the module's weight becomes W + scale * B @ A with scale = alpha / r (alpha / sqrt(r) for
rsLoRA). The adapter records the fingerprint of the base it was made for.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from .arch import ModelConfig
from .errors import EdgeloraError
from .naming import LORA_TARGETS

MAX_DELTA_RMS = 1.0
_TARGET = re.compile(r"^layers\.(\d+)\.(\w+)$")


class AdapterError(EdgeloraError):
    """An adapter that cannot be used: malformed, or made for another base."""


class AdapterMismatchError(AdapterError):
    """An adapter whose names or shapes do not fit the base (every mismatch listed)."""


class AdapterBaseMismatchError(AdapterError):
    """An adapter made for another base model."""


@dataclass
class LoraTensor:
    A: np.ndarray  # (r, in)
    B: np.ndarray  # (out, r)
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


@dataclass
class LoraAdapter:
    tensors: dict[str, LoraTensor]
    base_fingerprint: str | None = None
    use_rslora: bool = False
    name: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.tensors:
            raise AdapterError("an adapter needs at least one target module")
        for target, t in self.tensors.items():
            m = _TARGET.match(target)
            if not m or m.group(2) not in LORA_TARGETS:
                raise AdapterError(f"adapter target {target!r} is not a canonical LoRA target (layers.N.{{{','.join(LORA_TARGETS)}}})")
            t.A = np.ascontiguousarray(t.A, dtype=np.float32)
            t.B = np.ascontiguousarray(t.B, dtype=np.float32)
            if t.A.ndim != 2 or t.B.ndim != 2 or t.A.shape[0] != t.B.shape[1]:
                raise AdapterError(f"adapter target {target}: A {t.A.shape} and B {t.B.shape} do not form a LoRA pair (A r x in, B out x r)")
            if not (np.isfinite(t.A).all() and np.isfinite(t.B).all()):
                raise AdapterError(f"adapter target {target}: A or B holds NaN or Inf")
            if not (isinstance(t.alpha, (int, float, np.floating, np.integer)) and math.isfinite(t.alpha) and t.alpha > 0):
                raise AdapterError(f"adapter target {target}: alpha {t.alpha!r} is not a positive finite number")
            t.alpha = float(t.alpha)

    # -- derived -----------------------------------------------------------------------------

    @property
    def targets(self) -> list[str]:
        return sorted(self.tensors, key=target_order)

    @property
    def ranks(self) -> dict[str, int]:
        return {t: self.tensors[t].rank for t in self.targets}

    @property
    def rank(self) -> int:
        return max(t.rank for t in self.tensors.values())

    @property
    def alpha(self) -> float:
        alphas = {t.alpha for t in self.tensors.values()}
        return alphas.pop() if len(alphas) == 1 else max(alphas)

    @property
    def target_kinds(self) -> list[str]:
        kinds = {t.rsplit(".", 1)[1] for t in self.tensors}
        return [k for k in LORA_TARGETS if k in kinds]

    def scale(self, target: str) -> float:
        t = self.tensors[target]
        return t.alpha / (math.sqrt(t.rank) if self.use_rslora else t.rank)

    def delta(self, target: str) -> np.ndarray:
        """The change to the module's weight (out x in): scale * B @ A."""
        t = self.tensors[target]
        return self.scale(target) * (t.B @ t.A)

    def num_parameters(self) -> int:
        return sum(t.A.size + t.B.size for t in self.tensors.values())

    def nbytes(self) -> int:
        return 4 * self.num_parameters()

    def delta_rms(self, target: str) -> float:
        """The root mean square of the module's update scale * B @ A, without forming it
        (||B A||_F^2 = sum((B^T B) * (A A^T)), in float64 so that extreme values do not overflow)."""
        t = self.tensors[target]
        a, b = t.A.astype(np.float64), t.B.astype(np.float64)
        sq = float(((b.T @ b) * (a @ a.T)).sum())
        return abs(self.scale(target)) * math.sqrt(max(sq, 0.0) / (a.shape[1] * b.shape[0]))

    # -- checks ------------------------------------------------------------------------------

    def check_values(self) -> None:
        """Refuses an update no base weight could take: a module whose scale * B @ A has an RMS over
        MAX_DELTA_RMS (base weights of these models have RMS ~0.01-0.1; a trained adapter's update
        ~1e-3), or that overflows. A corrupt file or a wrong alpha shows here."""
        for target in self.targets:
            rms = self.delta_rms(target)
            if not rms <= MAX_DELTA_RMS:
                raise AdapterError(
                    f"adapter {self.name or '(unnamed)'}: {target}'s update (scale * B @ A) has RMS {rms:.3g}, beyond "
                    f"any base weight (limit {MAX_DELTA_RMS:g}); the file is corrupt or its alpha is wrong")

    def check_fits(self, config: ModelConfig, fingerprint: str | None = None) -> None:
        """Refuses an adapter made for another base, or whose names or shapes do not fit `config`,
        listing every mismatch in one error."""
        if fingerprint and self.base_fingerprint and self.base_fingerprint != fingerprint:
            raise AdapterBaseMismatchError(
                f"adapter {self.name or '(unnamed)'} was made for base {self.base_fingerprint}, "
                f"but this base is {fingerprint}; use an adapter trained on this base")
        shapes = config.shapes()
        problems = []
        for target in self.targets:
            t = self.tensors[target]
            if target not in shapes:
                problems.append(f"{target}: no such module (the base has {config.num_layers} layers)")
                continue
            out_dim, in_dim = shapes[target]
            if t.A.shape[1] != in_dim:
                problems.append(f"{target}: A is {t.A.shape[0]}x{t.A.shape[1]}, the module takes {in_dim} inputs")
            if t.B.shape[0] != out_dim:
                problems.append(f"{target}: B is {t.B.shape[0]}x{t.B.shape[1]}, the module has {out_dim} outputs")
        if problems:
            raise AdapterMismatchError(
                f"adapter {self.name or '(unnamed)'} does not fit the base ({len(problems)} problems): {'; '.join(problems)}")
        self.check_values()

    # -- mixing ------------------------------------------------------------------------------

    @staticmethod
    def mix(weighted: Iterable[tuple["LoraAdapter", float]]) -> "LoraAdapter":
        """Several adapters active at once with weights w_i as one adapter: A is the stack of the
        A_i and B the side-by-side of w_i * s_i * B_i, so scale 1 (alpha = rank)."""
        weighted = [(a, float(w)) for a, w in weighted]
        if not weighted:
            raise AdapterError("mixing needs at least one adapter")
        fingerprints = {a.base_fingerprint for a, _ in weighted if a.base_fingerprint}
        if len(fingerprints) > 1:
            raise AdapterBaseMismatchError(f"cannot mix adapters made for different bases: {', '.join(sorted(fingerprints))}")
        targets = sorted({t for a, _ in weighted for t in a.tensors}, key=target_order)
        tensors = {}
        for target in targets:
            As, Bs = [], []
            for a, w in weighted:
                if target in a.tensors:
                    As.append(a.tensors[target].A)
                    Bs.append((w * a.scale(target)) * a.tensors[target].B)
            A = np.concatenate(As, axis=0)
            tensors[target] = LoraTensor(A, np.concatenate(Bs, axis=1), alpha=float(A.shape[0]))
        names = "+".join(f"{a.name or '?'}*{w:g}" for a, w in weighted)
        return LoraAdapter(tensors, base_fingerprint=next(iter(fingerprints), None), name=names,
                           provenance={"method": "mix", "of": [[a.name, w] for a, w in weighted]})

    def summary(self) -> dict[str, Any]:
        ranks = sorted(set(self.ranks.values()))
        return {
            "name": self.name, "base": self.base_fingerprint, "targets": ",".join(self.target_kinds),
            "modules": len(self.tensors), "rank": ranks[0] if len(ranks) == 1 else ranks,
            "alpha": self.alpha, "rslora": self.use_rslora, "parameters": self.num_parameters(),
            "provenance": self.provenance,
        }


def fuse_members(adapter: LoraAdapter, members: tuple[str, ...],
                 shapes: dict[str, tuple[int, ...]]) -> tuple[LoraTensor, dict[str, list[int]]] | None:
    """One LoRA pair for a module a family stores fused (Phi-3's qkv_proj: q, k, v stacked by rows),
    from the adapter's members, or None if it has none of them. Members with one A and one alpha
    (PEFT's own layout for a fused module) keep that A, their B's stacked; otherwise the A's are
    stacked and B is block-diagonal with each member's scale folded in (the pair's scale is 1), and
    the second value names each member's rank range so `split_fused` gives them back exactly."""
    present = [m for m in members if m in adapter.tensors]
    if not present:
        return None
    ts = {m: adapter.tensors[m] for m in present}
    first = ts[present[0]]
    if len(present) == len(members) and all(np.array_equal(t.A, first.A) and t.alpha == first.alpha for t in ts.values()):
        return LoraTensor(first.A, np.concatenate([ts[m].B for m in members], 0), first.alpha), {}
    r = sum(t.rank for t in ts.values())
    A = np.concatenate([t.A for t in ts.values()], 0)
    B = np.zeros((sum(shapes[m][0] for m in members), r), np.float32)
    ranges, row, col = {}, 0, 0
    for m in members:
        if m in ts:
            t = ts[m]
            B[row:row + shapes[m][0], col:col + t.rank] = t.B * np.float32(adapter.scale(m))
            ranges[m] = [col, col + t.rank]
            col += t.rank
        row += shapes[m][0]
    return LoraTensor(A, B, math.sqrt(r) if adapter.use_rslora else float(r)), ranges


def split_fused(t: LoraTensor, members: tuple[str, ...], shapes: dict[str, tuple[int, ...]],
                ranges: dict[str, list[int]] | None = None, rslora: bool = False) -> dict[str, LoraTensor]:
    """The members of a fused module's LoRA pair (the inverse of `fuse_members`); without
    `ranges` every member shares the pair's A."""
    out, row = {}, 0
    scale = t.alpha / (math.sqrt(t.rank) if rslora else t.rank)
    for m in members:
        rows = t.B[row:row + shapes[m][0]]
        row += shapes[m][0]
        if not ranges:
            out[m] = LoraTensor(t.A.copy(), np.ascontiguousarray(rows), t.alpha)
        elif m in ranges:
            r0, r1 = ranges[m]
            alpha = scale * (math.sqrt(r1 - r0) if rslora else r1 - r0)
            out[m] = LoraTensor(t.A[r0:r1].copy(), np.ascontiguousarray(rows[:, r0:r1]), alpha)
    if row != t.B.shape[0]:
        raise AdapterError(f"a fused LoRA B has {t.B.shape[0]} rows, its modules {'+'.join(members)} have {row}")
    return out


def target_order(target: str) -> tuple[int, int]:
    layer, kind = target.split(".")[1:]
    return int(layer), LORA_TARGETS.index(kind)


def random_adapter(config: ModelConfig, *, rank: int = 8, alpha: float = 16.0, targets: Iterable[str] = LORA_TARGETS,
                   seed: int = 0, scale: float = 0.05, fingerprint: str | None = None, name: str = "random") -> LoraAdapter:
    """An adapter with random A and B (both non-zero): for tests and benchmarks."""
    rng = np.random.default_rng(seed)
    shapes = config.shapes()
    tensors = {}
    for i in range(config.num_layers):
        for kind in targets:
            out_dim, in_dim = shapes[f"layers.{i}.{kind}"]
            tensors[f"layers.{i}.{kind}"] = LoraTensor(
                rng.standard_normal((rank, in_dim), dtype=np.float32) * scale,
                rng.standard_normal((out_dim, rank), dtype=np.float32) * scale, alpha)
    return LoraAdapter(tensors, base_fingerprint=fingerprint, name=name, provenance={"method": "random", "seed": seed})
