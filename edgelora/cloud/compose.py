"""Composing one adapter from a library of adapters, as LoraHub does.

* From a task description alone: each library adapter's name and description are compared with
  the task's (TF-IDF cosine over words); the best matches are mixed, weighted by similarity.
* From a few examples (and optionally a description): mixture weights are searched without
  gradients (an evolution strategy, LoraHub uses CMA-ES) to minimize the examples' loss plus an
  L1 penalty on the weights, the loss computed by edgelora's numpy model on the base's weights.

The composite is one `LoraAdapter`: the A's stacked and the weighted B's side by side (`mix`).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from edgelora.adapters import LoraAdapter
from edgelora.errors import EdgeloraError

_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset("""a an and are as at be by for from how i in is it its me my of on or so that the this to
    was what when with you your do does like make makes please should would can could will about into""".split())


class ComposeError(EdgeloraError):
    """A composition that cannot be made (no library adapters, nothing matches the description)."""


def _words(text: str) -> list[str]:
    out = []
    for w in _WORD.findall(text.lower()):
        if w in _STOP:
            continue
        if len(w) > 4 and w.endswith("s") and not w.endswith("ss"):  # plurals: "pirates" ~ "pirate"
            w = w[:-1]
        out.append(w)
    return out


def similarities(query: str, documents: list[str]) -> np.ndarray:
    """TF-IDF cosine similarity of `query` to each document (0 when no word is shared)."""
    docs = [Counter(_words(d)) for d in documents]
    q = Counter(_words(query))
    n = len(docs) + 1
    df = Counter(w for d in [*docs, q] for w in d)
    idf = {w: math.log((1 + n) / (1 + c)) + 1.0 for w, c in df.items()}

    def vec(c: Counter) -> dict[str, float]:
        return {w: (1 + math.log(k)) * idf[w] for w, k in c.items()}

    qv = vec(q)
    qn = math.sqrt(sum(v * v for v in qv.values())) or 1.0
    out = np.zeros(len(docs))
    for i, d in enumerate(docs):
        dv = vec(d)
        dn = math.sqrt(sum(v * v for v in dv.values())) or 1.0
        out[i] = sum(qv[w] * dv[w] for w in qv.keys() & dv.keys()) / (qn * dn)
    return out


def weights_from_description(description: str, documents: list[str], *, top_k: int = 3,
                             keep: float = 0.5) -> np.ndarray:
    """Mixture weights from similarity: the top `top_k` adapters within `keep` x the best score,
    weighted in proportion to their similarity and summing to 1."""
    sims = similarities(description, documents)
    if not len(sims) or sims.max() <= 0:
        raise ComposeError("no library adapter's description shares a word with the task description; "
                           "describe the task differently or send a few examples")
    order = np.argsort(-sims, kind="stable")[:top_k]
    chosen = [i for i in order if sims[i] >= keep * sims[order[0]]]
    w = np.zeros(len(sims))
    w[chosen] = sims[chosen] / sims[chosen].sum()
    return w


@dataclass
class SearchResult:
    weights: np.ndarray
    loss: float
    start_loss: float
    evaluations: int
    history: list[float] = field(default_factory=list)


class ExampleLoss:
    """Mean masked cross-entropy of tokenized examples under base + sum_i w_i * adapter_i, computed
    by the numpy trainer's model (the LoRA factors are stacked once; only B's scale changes)."""

    def __init__(self, weights: dict[str, np.ndarray], config, adapters: list[LoraAdapter], examples):
        from edgelora.train.model import LORA_KINDS, LoraParams, LoraSpec, Workspace

        self.weights, self.config, self.examples = weights, config, examples
        targets = sorted({t for a in adapters for t in a.tensors})
        kinds = tuple(k for k in LORA_KINDS if any(t.endswith("." + k) for t in targets))
        self.rank = sum(max(a.ranks.values()) for a in adapters)
        self.lora = LoraParams(config, LoraSpec(self.rank, float(self.rank), kinds))  # scale 1
        self.blocks: list[list[tuple[np.ndarray, slice, np.ndarray]]] = [[] for _ in adapters]
        for name in {n.rsplit(".", 1)[0] for n in self.lora.views}:
            A, off = self.lora.views[name + ".A"], 0
            for j, a in enumerate(adapters):
                r = max(a.ranks.values())
                if name in a.tensors:
                    t = a.tensors[name]
                    A[off:off + t.rank] = t.A
                    self.blocks[j].append((self.lora.views[name + ".B"], slice(off, off + t.rank),
                                           (a.scale(name) * t.B).astype(np.float32)))
                off += r
        self.ws = Workspace()

    def __call__(self, w: np.ndarray) -> float:
        from edgelora.train.model import masked_loss

        for j, blocks in enumerate(self.blocks):
            for B, cols, sB in blocks:
                B[:, cols] = w[j] * sB
        total = 0.0
        for ex in self.examples:
            total += masked_loss(self.weights, self.lora, ex.tokens[None], ex.mask[None], self.config, workspace=self.ws)
        return total / len(self.examples)


def search_weights(loss: Callable[[np.ndarray], float], n: int, *, start: np.ndarray | None = None,
                   budget: int = 40, l1: float = 0.05, bound: float = 1.5, seed: int = 0,
                   progress: Callable[[int, int, float], None] | None = None) -> SearchResult:
    """Minimizes loss(w) + l1 * |w|_1 over w in [-bound, bound]^n by a (1+lambda) evolution strategy
    with step-size adaptation; deterministic under `seed`."""
    rng = np.random.default_rng(seed)
    objective = lambda w: loss(w) + l1 * float(np.abs(w).sum())  # noqa: E731
    best = np.clip(np.full(n, 1.0 / n) if start is None else np.asarray(start, float), -bound, bound)
    fbest = objective(best)
    history, evals, sigma, lam = [fbest], 1, 0.5, max(4, min(8, 2 * n))
    if progress:
        progress(evals, budget, fbest)
    while evals + lam <= budget:
        cands = np.clip(best + sigma * rng.standard_normal((lam, n)), -bound, bound)
        fs = []
        for c in cands:
            fs.append(objective(c))
            evals += 1
            if progress:
                progress(evals, budget, min(fbest, min(fs)))
        k = int(np.argmin(fs))
        if fs[k] < fbest:
            best, fbest, sigma = cands[k], fs[k], min(sigma * 1.3, bound)
        else:
            sigma *= 0.6
        history.append(fbest)
    return SearchResult(best, fbest, history[0], evals, history)


def compose(adapters: list[LoraAdapter], weights: np.ndarray, *, threshold: float = 1e-3) -> LoraAdapter:
    """The composite of `adapters` at `weights` (adapters with |w| below `threshold` left out)."""
    chosen = [(a, float(w)) for a, w in zip(adapters, weights) if abs(w) >= threshold]
    if not chosen:
        raise ComposeError("every mixture weight came out zero; send more examples or a description")
    return LoraAdapter.mix(chosen)
