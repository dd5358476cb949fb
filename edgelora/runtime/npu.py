"""The NPU engine: static prefill and decode graphs over a fixed-size KV buffer (see
`edgelora.converters.onnx_npu`), on ONNX Runtime's QNN execution provider with the HTP backend and
CPU fallback disabled (a graph runs wholly on the NPU or fails to load), or on the CPU execution
provider to check the QDQ numerics. Adapters enter the graphs' LoRA slots as inputs (one adapter or
a weighted mix, zero-padded to the bundle's rank), so a swap changes feeds, never the graphs."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from edgelora.adapters import AdapterError, LoraAdapter
from edgelora.arch import ModelConfig
from edgelora.converters.onnx_npu import Geometry, check_lora_ranges, lora_feeds, read_geometry
from edgelora.tokenizer import Tokenizer

from .engine import Engine, EngineError

_QNN_REGISTERED = False


def qnn_htp_session(path: Path, threads: int = 1):
    """A session on QNN's HTP backend with CPU fallback disabled."""
    global _QNN_REGISTERED
    import onnxruntime as ort

    try:
        import onnxruntime_qnn
    except ImportError as e:
        raise EngineError("the NPU engine needs onnxruntime-qnn: pip install onnxruntime-qnn") from e
    if not _QNN_REGISTERED:
        ort.register_execution_provider_library("QNNExecutionProvider", onnxruntime_qnn.get_library_path())
        _QNN_REGISTERED = True
    devices = [d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"]
    if not devices:
        raise EngineError("no QNN device found after registering onnxruntime-qnn's execution provider")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    so.add_provider_for_devices(devices, {"backend_path": onnxruntime_qnn.get_qnn_htp_path()})
    from edgelora._native import quiet_native

    try:
        with quiet_native():
            return ort.InferenceSession(str(path), so)
    except Exception as e:
        raise EngineError(f"{path.name} does not run wholly on the QNN HTP backend: {str(e).splitlines()[0]}") from e


def cpu_session(path: Path, threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class StaticRunner:
    """The host loop: prefill in chunks of P (the last right-padded), decode one token at a time,
    each call's new K/V written into the buffer slot of its position."""

    def __init__(self, sessions: dict, geom: Geometry, prefix_kv: list[np.ndarray]):
        self.sess, self.g, self.prefix_kv = sessions, geom, prefix_kv
        self.recorded: dict[str, list] | None = None
        # the LoRA slots' inputs (zero: no adapter), shared by both graphs
        self.lora = {i.name: np.zeros(i.shape, np.float32) for i in sessions["decode"].get_inputs()
                     if i.name.startswith("lora_")}
        self.reset()

    @classmethod
    def open(cls, root: Path, provider: str = "htp", threads: int = 1, graphs: dict | None = None) -> "StaticRunner":
        geom, prefix_kv = read_geometry(root)
        graphs = graphs or {k: root / f"{k}.onnx" for k in ("prefill", "decode")}
        make = qnn_htp_session if provider == "htp" else cpu_session
        return cls({k: make(Path(p), threads) for k, p in graphs.items()}, geom, prefix_kv)

    def reset(self) -> None:
        g = self.g
        self.past = [np.zeros((1, g.n_kv, g.ctx, g.head_dim), np.float32) for _ in range(2 * g.n_layers)]
        for buf, kv in zip(self.past, self.prefix_kv):
            buf[:, :, : kv.shape[2]] = kv
        self.pos = len(g.prefix_tokens)

    def run(self, kind: str, tokens: Sequence[int]) -> np.ndarray:
        g, n, p0 = self.g, len(tokens), self.pos
        t = g.prefill_len if kind == "prefill" else 1
        if not 0 < n <= t or p0 + n > g.ctx:
            raise EngineError(f"{p0 + n} positions do not fit the NPU graphs' window of {g.ctx}")
        ids = np.full((1, t), tokens[-1], np.int64)  # pad by repeating the last token (not id 0: it has massive activations)
        ids[0, :n] = tokens
        mask = np.full((t, g.ctx + t), g.mask_value, np.float32)
        mask[:, :p0] = 0.0
        mask[:, g.ctx:] = np.triu(np.full((t, t), g.mask_value, np.float32), k=1)
        feeds = {"input_ids": ids, "position_ids": (p0 + np.arange(t, dtype=np.int64))[None], "attn_mask": mask[None, None]}
        if g.window:  # keys (buffer slot = position; new tokens after the buffer) too far back for the window
            q_pos = p0 + np.arange(t)[:, None]
            k_pos = np.concatenate([np.arange(g.ctx), p0 + np.arange(t)])[None, :]
            local = np.where(q_pos - k_pos >= g.window, np.float32(g.mask_value), mask)
            feeds["attn_mask_local"] = local[None, None].astype(np.float32)
        for i in range(g.n_layers):
            feeds[f"past_k_{i}"], feeds[f"past_v_{i}"] = self.past[2 * i], self.past[2 * i + 1]
        feeds.update(self.lora)
        if self.recorded is not None:
            self.recorded[kind].append({k: v.copy() for k, v in feeds.items()})
        outs = self.sess[kind].run(None, feeds)
        for buf, x in zip(self.past, outs[1:]):
            buf[:, :, p0:p0 + n] = x[:, :, :n]
        self.pos += n
        return outs[0][0, :n]

    def feed(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits of every token fed: prefill chunks for many, the decode graph for one."""
        tokens = list(tokens)
        if len(tokens) == 1 and self.pos > len(self.g.prefix_tokens):
            return self.run("decode", tokens)
        p = self.g.prefill_len
        return np.concatenate([self.run("prefill", tokens[i:i + p]) for i in range(0, len(tokens), p)])

    def record(self, sequences: list[list[int]], n_decode: int) -> dict[str, list]:
        """The feeds both graphs see while scoring `sequences` (for calibration)."""
        self.recorded = {"prefill": [], "decode": []}
        for seq in sequences:
            self.reset()
            self.feed(seq[:-n_decode])
            for tok in seq[-n_decode:]:
                self.run("decode", [tok])
        out, self.recorded = self.recorded, None
        return out


class NpuEngine(Engine):
    backend = "onnx"

    def __init__(self, root: str | Path, config: ModelConfig, *, provider: str = "htp", threads: int = 1,
                 tokenizer: Tokenizer | None = None, fingerprint: str | None = None, n_ctx: int | None = None):
        self.root = Path(root)
        self.runner = StaticRunner.open(self.root, provider, threads)
        self.prefix = list(self.runner.g.prefix_tokens)
        super().__init__(config, tokenizer, fingerprint, self.runner.g.ctx - len(self.prefix))
        self.provider = provider

    def _strip(self, ids: Sequence[int]) -> list[int]:
        ids = list(ids)
        return ids[len(self.prefix):] if ids[:len(self.prefix)] == self.prefix else ids

    def _reset(self) -> None:
        self.runner.reset()

    def _feed(self, token_ids: Sequence[int]) -> np.ndarray:
        ids = self._strip(token_ids) if self.runner.pos == len(self.prefix) else list(token_ids)
        return self.runner.feed(ids)[-1]

    def _logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Logits of the sequence after the fixed prefix (a leading prefix token in `token_ids` is
        the prefix itself: its logits come from the float export)."""
        self.runner.reset()
        return self.runner.feed(self._strip(token_ids))

    def _slot_feeds(self, adapter: LoraAdapter | None, name: str) -> dict[str, np.ndarray]:
        g = self.runner.g
        if not g.lora_rank:
            raise AdapterError("this NPU bundle's graphs have no LoRA slots: export it again with this edgelora "
                               "to run adapters on the NPU")
        feeds = lora_feeds(adapter, self.config, g.lora_rank)
        check_lora_ranges(feeds, g, self.config, name)
        return feeds

    def _load_adapter(self, name, path, adapter) -> None:
        self._slot_feeds(adapter, name)  # refused now (rank, range) rather than at activation

    def _merge(self, adapter, weight) -> None:
        raise AdapterError("the NPU graphs' weights are compiled in and cannot be merged into: use set_adapters")

    def _activate(self, weights) -> None:
        if not weights:
            self.runner.lora = {k: np.zeros_like(v) for k, v in self.runner.lora.items()}
            return
        mix = LoraAdapter.mix([(self._adapters.values[n], w) for n, w in weights.items()])
        self.runner.lora = self._slot_feeds(mix, mix.name)
