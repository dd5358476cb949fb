"""What both engines share: prompt handling, the decode loop with numpy sampling, and adapter
bookkeeping. A backend supplies `_reset`, `_feed` (tokens -> logits of the last one),
`_logits` (a whole sequence from an empty cache), `_load_adapter` and `_activate`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from edgelora.adapters import AdapterError, LoraAdapter
from edgelora.arch import ModelConfig
from edgelora.errors import EdgeloraError
from edgelora.tokenizer import Tokenizer


class EngineError(EdgeloraError):
    exit_code = 1


@dataclass
class Generation:
    text: str
    tokens: list[int]
    prompt_tokens: int
    seconds_prefill: float
    seconds_decode: float
    stopped: str  # "eos" or "length"

    @property
    def decode_tokens_per_second(self) -> float:
        n = max(len(self.tokens) - 1, 0)
        return n / self.seconds_decode if self.seconds_decode > 0 else float("nan")


def sample(logits: np.ndarray, rng: np.random.Generator, temperature: float, top_k: int, top_p: float) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    if 0 < top_k < z.size:
        kth = np.partition(z, -top_k)[-top_k]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if 0 < top_p < 1:
        order = np.argsort(-p)
        keep = np.cumsum(p[order]) - p[order] < top_p
        mask = np.zeros_like(p, dtype=bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return int(rng.choice(p.size, p=p))


@dataclass
class _AdapterState:
    paths: dict[str, Path] = field(default_factory=dict)
    values: dict[str, LoraAdapter] = field(default_factory=dict)
    active: dict[str, float] = field(default_factory=dict)


class Engine:
    backend = "?"

    def __init__(self, config: ModelConfig, tokenizer: Tokenizer | None, fingerprint: str | None, n_ctx: int):
        self.config = config
        self.tokenizer = tokenizer
        self.fingerprint = fingerprint
        self.n_ctx = n_ctx
        self._adapters = _AdapterState()
        self.resolver = None  # name -> (file, validated adapter), for names not loaded yet (a bundle's store)
        self.merged: tuple[str, float] | None = None

    # -- backend hooks -----------------------------------------------------------------------

    def _reset(self) -> None:
        raise NotImplementedError

    def _feed(self, token_ids: Sequence[int]) -> np.ndarray:
        raise NotImplementedError

    def _logits(self, token_ids: Sequence[int]) -> np.ndarray:
        raise NotImplementedError

    def _load_adapter(self, name: str, path: Path, adapter: LoraAdapter) -> None:
        raise NotImplementedError

    def _activate(self, weights: dict[str, float]) -> None:
        raise NotImplementedError

    def _merge(self, adapter: LoraAdapter, weight: float) -> None:
        """Switch the forward to a base with `weight` x the adapter folded into its weights."""
        raise NotImplementedError

    def _unmerge(self) -> None:
        """Switch the forward back to the original base (which stayed loaded)."""
        raise NotImplementedError

    # -- logits ------------------------------------------------------------------------------

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Logits (len(token_ids) x vocab) of one sequence from an empty cache, under the active adapters."""
        ids = list(token_ids)
        if not ids:
            raise EngineError("logits() needs at least one token")
        if len(ids) > self.n_ctx:
            raise EngineError(f"{len(ids)} tokens do not fit the context of {self.n_ctx}")
        return self._logits(ids)

    # -- adapters ----------------------------------------------------------------------------

    def load_adapter(self, name: str, path: str | Path, adapter: LoraAdapter | None = None) -> None:
        """Makes an adapter file available under `name` (validated first; nothing active changes)."""
        path = Path(path)
        if adapter is None:
            adapter = self._read_adapter(path)
        adapter.check_fits(self.config, self.fingerprint)
        self._load_adapter(name, path, adapter)
        self._adapters.paths[name] = path
        self._adapters.values[name] = adapter

    def _read_adapter(self, path: Path) -> LoraAdapter:
        from edgelora.converters import load_adapter

        return load_adapter(path, self.config)

    @property
    def loaded_adapters(self) -> list[str]:
        return list(self._adapters.paths)

    @property
    def active_adapters(self) -> dict[str, float]:
        return dict(self._adapters.active)

    def set_adapters(self, weights: Mapping[str, float] | Sequence[str] | None) -> None:
        """Activates none, one or several loaded adapters (mixed by weight). The base is not
        reloaded; the KV cache is reset, since it was computed under the old adapters."""
        if weights is None:
            weights = {}
        elif not isinstance(weights, Mapping):
            weights = {n: 1.0 for n in weights}
        weights = {n: float(w) for n, w in weights.items() if w != 0}
        if self.merged and weights:
            raise AdapterError(f"adapter {self.merged[0]} is merged into the base: unmerge() before activating adapters")
        if self.resolver is not None:
            for n in weights:
                if n not in self._adapters.paths:
                    self.load_adapter(n, *self.resolver(n))
        unknown = [n for n in weights if n not in self._adapters.paths]
        if unknown:
            raise AdapterError(f"adapter(s) {', '.join(unknown)} not loaded; loaded: {', '.join(self._adapters.paths) or 'none'}")
        self._activate(weights)
        self._adapters.active = weights
        self._reset()

    def clear_adapters(self) -> None:
        self.set_adapters({})

    def merge(self, name: str, weight: float = 1.0) -> None:
        """Folds a loaded adapter into a copy of the base weights (for decode with no LoRA overhead).
        The original base stays loaded, so `unmerge` returns to it exactly."""
        if self.resolver is not None and name not in self._adapters.paths:
            self.load_adapter(name, *self.resolver(name))
        if name not in self._adapters.values:
            raise AdapterError(f"adapter {name} not loaded; loaded: {', '.join(self._adapters.paths) or 'none'}")
        if self.merged:
            self.unmerge()
        self.set_adapters({})
        self._merge(self._adapters.values[name], float(weight))
        self.merged = (name, float(weight))
        self._reset()

    def unmerge(self) -> None:
        if self.merged:
            self._unmerge()
            self.merged = None
            self._reset()

    # -- generation --------------------------------------------------------------------------

    def encode_prompt(self, prompt: str | Sequence[Mapping[str, str]]) -> list[int]:
        if self.tokenizer is None:
            raise EngineError("this engine has no tokenizer: pass token ids")
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        text = self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def stream(self, prompt: str | Sequence[Mapping[str, str]] | Sequence[int], max_tokens: int = 128,
               temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
               stats: dict | None = None) -> Iterator[int]:
        """Yields generated token ids one by one."""
        ids = list(prompt) if prompt and isinstance(prompt, (list, tuple)) and isinstance(prompt[0], int) \
            else self.encode_prompt(prompt)
        if len(ids) + max_tokens > self.n_ctx:
            max_tokens = max(self.n_ctx - len(ids), 0)
            if max_tokens == 0:
                raise EngineError(f"the prompt ({len(ids)} tokens) fills the context of {self.n_ctx}")
        rng = np.random.default_rng(seed)
        eos = self.tokenizer.eos_token_id if self.tokenizer else None
        self._reset()
        t0 = time.perf_counter()
        logits = self._feed(ids)
        t1 = time.perf_counter()
        stopped = "length"
        n = 0
        for n in range(max_tokens):
            tok = sample(logits, rng, temperature, top_k, top_p)
            if tok == eos:
                stopped = "eos"
                break
            yield tok
            if n + 1 < max_tokens:
                logits = self._feed([tok])
        if stats is not None:
            stats.update(prompt_tokens=len(ids), seconds_prefill=t1 - t0, seconds_decode=time.perf_counter() - t1,
                         stopped=stopped)

    def generate(self, prompt: str | Sequence[Mapping[str, str]] | Sequence[int], max_tokens: int = 128,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0) -> Generation:
        stats: dict = {}
        tokens = list(self.stream(prompt, max_tokens, temperature, top_p, top_k, seed, stats=stats))
        text = self.tokenizer.decode(tokens, skip_special_tokens=True) if self.tokenizer else ""
        return Generation(text, tokens, stats["prompt_tokens"], stats["seconds_prefill"], stats["seconds_decode"],
                          stats["stopped"])

    def close(self) -> None:
        pass

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
