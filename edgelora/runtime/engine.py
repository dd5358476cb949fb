"""What both engines share: prompt handling, the decode loop with numpy sampling, and adapter
bookkeeping. A backend supplies `_reset`, `_feed` (tokens -> logits of the last one),
`_logits` (a whole sequence from an empty cache), `_load_adapter` and `_activate`."""

from __future__ import annotations

import math
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
    """A runtime that fails (or produces non-finite logits) on input it accepted."""

    exit_code = 1


class EngineInputError(EngineError):
    """A request the engine refuses: token ids out of range, a prompt over the context, bad
    sampling settings, a closed engine."""

    exit_code = 2


MAX_ADAPTER_WEIGHT = 16.0  # |weight| of an adapter in set_adapters: beyond it a mix is a mistake, not a choice


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
        self._closed = False
        # time inside the runtime in one-token steps, where the engine counts it (ONNX; the loop's cost is the rest)
        self.runtime_decode_seconds = 0.0

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
        ids = self._check_ids(token_ids)
        if len(ids) > self.n_ctx:
            raise EngineInputError(f"{len(ids)} tokens do not fit the context of {self.n_ctx}")
        return _finite(self._logits(ids))

    def _check_ids(self, token_ids: Sequence[int]) -> list[int]:
        """The ids as a list, or one line naming the first that is not a token of this model."""
        if self._closed:
            raise EngineInputError("this engine is closed; open another (bundle.engine())")
        if isinstance(token_ids, (str, bytes)):
            raise EngineInputError("token ids must be a sequence of ints; pass text to generate() or stream()")
        ids = list(token_ids)
        if not ids:
            raise EngineInputError("the prompt is empty: give at least one token")
        vocab = self.config.vocab_size
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < vocab:
                raise EngineInputError(f"token {i} of the prompt ({t!r}) is not a token id of this model (0..{vocab - 1})")
        return [int(t) for t in ids]

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
        self._set_adapters(weights, reset=True)

    def _set_adapters(self, weights: Mapping[str, float] | Sequence[str] | None, *, reset: bool) -> None:
        """`set_adapters`; with reset=False the KV cache stays, computed under the old setting: no
        answer should continue on it, a speed measurement may (`decode_rates`)."""
        if weights is None:
            weights = {}
        elif isinstance(weights, str):
            raise AdapterError(f"set_adapters takes a list of names or a {{name: weight}} mapping, not a string: "
                               f"use [{weights!r}]")
        elif not isinstance(weights, Mapping):
            weights = {n: 1.0 for n in weights}
        weights = {n: _weight(n, w) for n, w in weights.items()}
        weights = {n: w for n, w in weights.items() if w != 0}
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
        if reset:
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
        """Yields generated token ids one by one. `prompt` is text (completed as it is, with no chat
        template), a list of chat messages ({"role", "content"}: the model's chat template is
        applied), or token ids."""
        _check_sampling(max_tokens, temperature, top_p, top_k)
        if isinstance(prompt, str) and not prompt:
            raise EngineInputError("the prompt is empty")
        is_ids = isinstance(prompt, (list, tuple, np.ndarray)) and (not len(prompt) or not isinstance(prompt[0], Mapping))
        ids = self._check_ids(prompt if is_ids else self.encode_prompt(prompt))
        if len(ids) + max_tokens > self.n_ctx:
            max_tokens = max(self.n_ctx - len(ids), 0)
            if max_tokens == 0:
                raise EngineInputError(f"the prompt ({len(ids)} tokens) fills the context of {self.n_ctx}; "
                                       "shorten it or export with a longer context")
        rng = np.random.default_rng(seed)
        eos = self.tokenizer.eos_token_id if self.tokenizer else None
        self._reset()
        t0 = time.perf_counter()
        logits = _finite(self._feed(ids))
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
                logits = _finite(self._feed([tok]))
        if stats is not None:
            stats.update(prompt_tokens=len(ids), seconds_prefill=t1 - t0, seconds_decode=time.perf_counter() - t1,
                         stopped=stopped)

    def generate(self, prompt: str | Sequence[Mapping[str, str]] | Sequence[int], max_tokens: int = 128,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0) -> Generation:
        """The whole generation (see `stream`: text is completed as it is; chat messages get the chat
        template)."""
        stats: dict = {}
        tokens = list(self.stream(prompt, max_tokens, temperature, top_p, top_k, seed, stats=stats))
        text = self.tokenizer.decode(tokens, skip_special_tokens=True) if self.tokenizer else ""
        return Generation(text, tokens, stats["prompt_tokens"], stats["seconds_prefill"], stats["seconds_decode"],
                          stats["stopped"])

    def close(self) -> None:
        """Frees the runtime's memory; the engine refuses work afterwards."""
        if not self._closed:
            self._closed = True
            self._close()

    def _close(self) -> None:
        pass

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


RATE_BLOCK = 8  # tokens one adapter setting runs before the next takes its turn (`decode_rates`)
SPEED_PROMPT = [{"role": "user", "content": "Write a short paragraph about why small language models are useful on phones."}]


@dataclass(frozen=True)
class DecodeRate:
    """One adapter setting's decode speed (see `decode_rates`)."""
    tokens_per_second: float
    loop_overhead: float | None = None  # the decode loop's time over the runtime's own, where the engine counts it
    of_first: float | None = None  # paired speed ratio to the first setting (`paired_ratio`); None for the first
    of_first_ci: tuple[float, float] | None = None  # its 95% interval (`median_interval`)


def median_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """The median of `values` and a distribution-free `level` interval for it: the order statistics
    k and n-k+1 whose binomial(n, 1/2) tail is at most (1-level)/2 (the widest, min to max, when n is
    too small for the level)."""
    x = np.sort(np.asarray(values, dtype=float))
    n = len(x)
    if n == 0:
        raise EngineInputError("median_interval needs at least one value")
    tail, k = 0.0, 0
    while k < n // 2:
        tail += math.comb(n, k) / 2.0 ** n
        if tail > (1 - level) / 2:
            break
        k += 1
    k = max(k, 1)  # the k-th smallest (1-based) is the lower end
    return float(np.median(x)), float(x[k - 1]), float(x[n - k])


def paired_ratio(blocks: Sequence[tuple[str, float, int]], label: str, ref: str) -> tuple[float, float, float] | None:
    """How fast setting `label` runs against `ref`, paired: `blocks` are (label, seconds a token,
    answer) in the order they ran; each `label` block's time is set against the nearest `ref`
    blocks before and after it in the same answer, interpolated to its place (the one there is, at
    an answer's edge), so the machine's drift and the context's growth cancel pair by pair;
    the median of those speed ratios with its 95% interval (`median_interval`), or None without any
    pair."""
    ratios = []
    for i, (lab, seconds, answer) in enumerate(blocks):
        if lab != label:
            continue
        before = next((j for j in range(i - 1, -1, -1) if blocks[j][0] == ref and blocks[j][2] == answer), None)
        after = next((j for j in range(i + 1, len(blocks)) if blocks[j][0] == ref and blocks[j][2] == answer), None)
        if before is None and after is None:
            continue
        if before is None or after is None:
            near = blocks[before if after is None else after][1]
        else:
            near = blocks[before][1] + (blocks[after][1] - blocks[before][1]) * (i - before) / (after - before)
        ratios.append(near / seconds)
    return median_interval(ratios) if ratios else None


def decode_rates(engine: "Engine", settings: Mapping[str, Mapping[str, float]], *, tokens: int = 64, rounds: int = 5,
                 block: int = RATE_BLOCK, prompt=SPEED_PROMPT) -> dict[str, DecodeRate]:
    """Decode speed of `engine` under each adapter setting (label -> weights), the settings taking
    turns every `block` tokens inside the same generations (a swap costs microseconds and keeps the
    KV cache here, so the context grows as in one answer), so the machine's drift and the context's
    length hit them alike: the step after each switch is not timed, and each setting's figure is the median over its blocks of `tokens * rounds` timed tokens,
    with its speed against the first setting's paired block by block (`paired_ratio`; the ratio to quote).
    Whole answers in turn are no measure of an adapter's cost on a shared machine: one answer's
    rate swings by 10% from the next, more than an adapter costs."""
    if not settings or block < 1 or tokens < 1 or rounds < 1:
        raise EngineInputError("decode_rates needs at least one setting and block, tokens and rounds >= 1")
    labels = list(settings)
    blocks: list[tuple[str, float, int]] = []  # (label, seconds a token, answer) in the order they ran
    overhead: dict[str, list[float]] = {k: [] for k in labels}
    timed = dict.fromkeys(labels, 0)
    turn = answer = 0
    try:
        while min(timed.values()) < tokens * rounds:
            steps = engine.stream(prompt, max_tokens=4 * tokens)
            answer += 1
            before = sum(timed.values())
            try:
                while min(timed.values()) < tokens * rounds:
                    label = labels[turn % len(labels)]
                    engine._set_adapters(dict(settings[label]), reset=False)  # the answer goes on at its length
                    next(steps)  # the step after a switch: not timed
                    engine.runtime_decode_seconds = 0.0
                    t = time.perf_counter()
                    for _ in range(block):
                        next(steps)
                    seconds = time.perf_counter() - t
                    blocks.append((label, seconds / block, answer))
                    if engine.runtime_decode_seconds:
                        overhead[label].append(seconds / engine.runtime_decode_seconds - 1)
                    timed[label] += block
                    turn += 1
            except StopIteration:  # the answer ended: a new generation, and the turns go on
                if sum(timed.values()) == before:
                    raise EngineInputError(f"the prompt's answer ends within {block + 1} tokens; "
                                           "measure on a prompt whose answer runs long") from None
    finally:
        engine.set_adapters({})
    rates = {}
    for k in labels:
        paired = paired_ratio(blocks, k, labels[0]) if k != labels[0] else None
        per_token = [s for label, s, _ in blocks if label == k]
        rates[k] = DecodeRate(1 / float(np.median(per_token)), float(np.median(overhead[k])) if overhead[k] else None,
                              paired[0] if paired else None, paired[1:] if paired else None)
    return rates


def _finite(logits: np.ndarray) -> np.ndarray:
    """`logits`, or an error if any row is NaN/Inf or constant over the whole vocabulary (what llama.cpp
    returns when its computation overflowed: no model answers that, and sampling it gives token 0)."""
    if not np.isfinite(logits).all() or (np.ptp(logits, axis=-1) == 0).any():
        raise EngineError("the model produced NaN or Inf logits (an adapter or mix weight with extreme values, or "
                          "a corrupt base); clear the adapters or re-export the bundle")
    return logits


def _weight(name: str, w: object) -> float:
    try:
        w = float(w)
    except (TypeError, ValueError):
        raise AdapterError(f"adapter {name}: weight {w!r} is not a number") from None
    if not math.isfinite(w) or abs(w) > MAX_ADAPTER_WEIGHT:
        raise AdapterError(f"adapter {name}: weight {w:g} is out of range; use a finite weight within "
                           f"±{MAX_ADAPTER_WEIGHT:g}")
    return w


def _check_sampling(max_tokens: int, temperature: float, top_p: float, top_k: int) -> None:
    if not isinstance(max_tokens, (int, np.integer)) or max_tokens < 0:
        raise EngineInputError(f"max_tokens must be a whole number >= 0, not {max_tokens!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise EngineInputError(f"temperature must be a finite number >= 0 (0 = greedy), not {temperature!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise EngineInputError(f"top_p must be in (0, 1], not {top_p!r}")
    if not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise EngineInputError(f"top_k must be a whole number >= 0 (0 = off), not {top_k!r}")
