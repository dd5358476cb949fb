"""Quality, measured: perplexity on a held-out text and top-1 agreement with the float model.

The text is cut into non-overlapping windows of `window` tokens; every token of a window but the
first is scored given the ones before it in that window (so all models see the same contexts).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .progress import ProgressFn

LogitsFn = Callable[[Sequence[int]], np.ndarray]
HELDOUT = "heldout.txt"


def heldout_text() -> str:
    """The held-out evaluation text shipped with edgelora (written for the project)."""
    return resources.files("edgelora.data").joinpath(HELDOUT).read_text(encoding="utf-8")


@dataclass
class Scores:
    """Per-token results of one model on one token sequence."""

    nll: np.ndarray  # (n_scored,) negative log-likelihood of each scored token
    top1: np.ndarray  # (n_scored,) the model's argmax at each scored position

    @property
    def perplexity(self) -> float:
        return float(math.exp(self.nll.mean()))


@dataclass
class QualityReport:
    perplexity: float
    float_perplexity: float
    perplexity_change: float  # relative: +0.013 = 1.3% worse than float
    top1_agreement: float  # share of positions where the argmax equals the float model's
    tokens: int  # scored tokens
    window: int

    def to_dict(self) -> dict[str, float | int]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    def within(self, max_increase: float, min_agreement: float) -> bool:
        return self.perplexity_change <= max_increase and self.top1_agreement >= min_agreement


def mean_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean KL(softmax p || softmax q) over positions, in nats (float64: small divergences survive)."""
    lp, lq = _log_softmax(p_logits), _log_softmax(q_logits)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def windows(tokens: Sequence[int], window: int) -> list[list[int]]:
    tokens = list(tokens)
    return [tokens[i:i + window] for i in range(0, len(tokens) - 1, window) if len(tokens[i:i + window]) > 1]


def score(logits_fn: LogitsFn, tokens: Sequence[int], window: int = 512, progress: ProgressFn | None = None) -> Scores:
    nll, top1 = [], []
    parts = windows(tokens, window)
    for i, ids in enumerate(parts):
        logits = np.asarray(logits_fn(ids), dtype=np.float64)[:-1]  # (n-1, vocab): predicts ids[1:]
        m = logits.max(-1, keepdims=True)
        logz = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[:, 0]
        target = np.asarray(ids[1:])
        nll.append(logz - logits[np.arange(len(target)), target])
        top1.append(logits.argmax(-1))
        if progress:
            progress(i + 1, len(parts))
    return Scores(np.concatenate(nll), np.concatenate(top1))


def compare(model: Scores, reference: Scores, window: int) -> QualityReport:
    return QualityReport(
        perplexity=model.perplexity, float_perplexity=reference.perplexity,
        perplexity_change=model.perplexity / reference.perplexity - 1.0,
        top1_agreement=float((model.top1 == reference.top1).mean()),
        tokens=int(model.nll.size), window=window,
    )


def text_key(tokens: Sequence[int], window: int) -> str:
    h = hashlib.sha256(np.asarray(tokens, dtype=np.int64).tobytes())
    h.update(f"window={window}".encode())
    return h.hexdigest()[:16]


def cached_reference(fingerprint: str, tokens: Sequence[int], window: int, compute: Callable[[], Scores],
                     cache: Path | None = None) -> Scores:
    """The float model's scores, computed once per (model, text, window) and kept in the cache."""
    from .models import cache_dir

    cache = cache or cache_dir() / "quality"
    path = cache / f"{fingerprint.split(':')[-1][:16]}-{text_key(tokens, window)}.npz"
    if path.exists():
        with np.load(path) as data:
            return Scores(data["nll"], data["top1"])
    scores = compute()
    from ._io import atomic_file

    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, nll=scores.nll, top1=scores.top1)
    return scores

