"""The ONNX engine: an onnxruntime session over a decoder with KV-cache inputs and outputs, with
LoRA adapters in the graph's LoRA slots. Several active adapters are mixed into one by
concatenation along the rank, so one slot serves any mix.

Two decode paths:
- edgelora's fused graph (GroupQueryAttention): the KV cache is one preallocated buffer per layer,
  bound as both past and present through IO binding, so no cache is copied per token. ONNX
  Runtime ignores active `LoraAdapter`s in `run_with_iobinding` (seen on 1.32), so the adapter's
  parameters are bound as the slots' inputs directly: in a MatMulQ41 graph one tensor, the adapter
  pack (`onnx_fused.pack_parameters`), laid out once when the adapter is loaded.
- other graphs (optimum's export): `session.run` with the adapter activated through `RunOptions`;
  the graph concatenates past and new K/V each step.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from edgelora.adapters import AdapterError, AdapterMismatchError, LoraAdapter
from edgelora.arch import ModelConfig
from edgelora.converters import keys, onnx_fused, onnx_model
from edgelora.tokenizer import Tokenizer

from .engine import Engine, EngineError

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(uint8)": np.uint8}  # of LoRA slots


class OnnxEngineError(EngineError):
    pass


class OnnxEngine(Engine):
    backend = "onnx"

    def __init__(self, path: str | os.PathLike, config: ModelConfig, *, threads: int = 2,
                 providers: Sequence[str] = ("CPUExecutionProvider",), n_ctx: int = 2048,
                 tokenizer: Tokenizer | None = None, fingerprint: str | None = None, profile: str | None = None):
        """`profile`: a file prefix for ONNX Runtime's per-node profile of every run (`end_profiling`)."""
        import onnxruntime as ort

        super().__init__(config, tokenizer, fingerprint, n_ctx)
        self._ort = ort
        self.path = Path(path)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        if profile:
            so.enable_profiling, so.profile_file_prefix = True, profile
        self.session = self._open(so, providers)
        self.past_names = [i.name for i in self.session.get_inputs() if _PAST.match(i.name)]
        if not self.past_names:
            raise OnnxEngineError(f"{self.path} has no past_key_values inputs: not a decoder with a KV cache")
        self.present_names = [n.replace("past_key_values", "present") for n in self.past_names]
        self.input_names = {i.name for i in self.session.get_inputs()}
        overridable = self.session.get_overridable_initializers()
        meta = self.session.get_modelmeta().custom_metadata_map
        self._slot_types = onnx_fused.slots_of({i.name: (_ORT_TYPES.get(i.type, np.float32), len(i.shape)) for i in overridable}, meta)
        self.slots = {i.name: i.shape for i in overridable if i.name in self._slot_types}
        self.shared_kv = meta.get(keys.GRAPH) == "fused"
        self.grouped = any(n.startswith("layers.0.qkv.lora") for n in self._slot_types)
        if self.grouped:  # adapters are checked per module, then laid out in the graph's grouped slots
            self.slots = onnx_fused.module_slots(config)
        if self.shared_kv:
            max_len = int(meta.get(keys.MAX_LEN, n_ctx))
            if n_ctx > max_len:
                raise OnnxEngineError(f"context {n_ctx} exceeds the {max_len} positions this graph was built for")
            c = self.config
            self._kv = {name: ort.OrtValue.ortvalue_from_numpy(np.zeros((1, c.num_kv_heads, n_ctx, c.head_dim), np.float32))
                        for name in self.past_names}
            self._logits_buf = np.zeros((1, 1, c.vocab_size), np.float32)  # onnxruntime writes into it
            self._step_logits = ort.OrtValue.ortvalue_from_numpy(self._logits_buf)
            self._step_ids = np.zeros((1, 1), np.int64)  # bound by address: a step writes the token in place
            self._ones = np.ones((1, n_ctx), np.int64)
        self._decode_io = None  # the reused decode binding (rebuilt when adapters or the session change)
        self._bound_params: dict[str, object] = {}  # slot name -> OrtValue of the active adapter(s)
        self._keep: list[object] = []  # what the bound OrtValues view into
        self._param_cache: dict[str, tuple[object, dict]] = {}
        self._run_options = ort.RunOptions()
        self._ort_adapters: dict[str, object] = {}
        self._mix_dir = tempfile.TemporaryDirectory(prefix="edgelora-mix-")
        self._mixes: dict[tuple, object] = {}
        self._so, self._providers = so, list(providers)
        self._base_session = self.session
        self._reset()

    def end_profiling(self) -> Path:
        """Ends the profile of an engine opened with `profile` and returns its JSON file."""
        return Path(self.session.end_profiling())

    # -- forward -----------------------------------------------------------------------------


    def _open(self, so, providers: Sequence[str]):
        """The session; a graph with edgelora's Q4_1 operator gets its library, or (when this process
        cannot load it: one warning line) the same graph with MatMulNBits, converted in memory."""
        import onnx

        from .. import native

        lib = native.library(warn=False)
        if lib is not None:
            so.register_custom_ops_library(str(lib))
        try:
            return self._ort.InferenceSession(str(self.path), so, providers=list(providers))
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            error = e
        if lib is None and onnx_fused.uses_q41(onnx.load(str(self.path), load_external_data=False)):
            native.library()  # the warning, with the reason
            model = onnx_fused.without_q41(onnx.load(str(self.path)))
            try:
                return self._ort.InferenceSession(model.SerializeToString(), so, providers=list(providers))
            except Exception as e:
                error = e
        raise OnnxEngineError(f"onnxruntime cannot load {self.path}: {str(error).splitlines()[0]}") from error
    def _empty_past(self) -> dict[str, np.ndarray]:
        c = self.config
        empty = np.zeros((1, c.num_kv_heads, 0, c.head_dim), np.float32)
        return {name: empty for name in self.past_names}

    def _run(self, ids: Sequence[int], past: dict[str, np.ndarray], past_len: int) -> list[np.ndarray]:
        n = len(ids)
        feed = {"input_ids": np.asarray([ids], np.int64), **past, **self._bound_params}
        if "attention_mask" in self.input_names:
            feed["attention_mask"] = np.ones((1, past_len + n), np.int64)
        if "position_ids" in self.input_names:
            feed["position_ids"] = np.arange(past_len, past_len + n, dtype=np.int64)[None]
        return self.session.run(["logits", *self.present_names], feed, self._run_options)

    def _binding(self, decode: bool):
        """An IO binding with the KV cache (in place), the adapter's slot parameters and, for decode,
        the fixed logits buffer bound; decode steps reuse one and rebind only ids and mask."""
        io = self.session.io_binding()
        if decode:
            io.bind_ortvalue_output("logits", self._step_logits)
            io.bind_input("input_ids", "cpu", 0, np.int64, [1, 1], self._step_ids.ctypes.data)
        else:
            io.bind_output("logits")
        for past, present in zip(self.past_names, self.present_names):
            io.bind_ortvalue_input(past, self._kv[past])
            io.bind_ortvalue_output(present, self._kv[past])
        for name, value in self._bound_params.items():
            io.bind_ortvalue_input(name, value)
        return io

    def _run_shared(self, ids: Sequence[int]) -> np.ndarray:
        """One step of the fused graph with the KV cache kept in place; returns logits [n, vocab]."""
        n = len(ids)
        decode = n == 1
        if decode:
            if self._decode_io is None:
                self._decode_io = self._binding(True)
            io = self._decode_io
            self._step_ids[0, 0] = ids[0]
        else:
            io = self._binding(False)
            io.bind_cpu_input("input_ids", np.asarray([ids], np.int64))
        io.bind_input("attention_mask", "cpu", 0, np.int64, [1, self.n_past + n], self._ones.ctypes.data)
        t = time.perf_counter()
        self.session.run_with_iobinding(io)
        if decode:
            self.runtime_decode_seconds += time.perf_counter() - t
        self.n_past += n
        return self._logits_buf[0] if decode else io.get_outputs()[0].numpy()[0]

    def _feed(self, token_ids: Sequence[int]) -> np.ndarray:  # the context is checked by Engine.stream
        if self.shared_kv:
            return self._run_shared(list(token_ids))[-1].copy()
        out = self._run(list(token_ids), self.past, self.n_past)
        self.past = dict(zip(self.past_names, out[1:]))
        self.n_past += len(token_ids)
        return out[0][0, -1]

    def _logits(self, token_ids: Sequence[int]) -> np.ndarray:
        if self.shared_kv:
            self._reset()
            out = self._run_shared(list(token_ids)).copy()
            self._reset()
            return out
        return self._run(list(token_ids), self._empty_past(), 0)[0][0]

    # -- adapters ----------------------------------------------------------------------------

    def _check_slots(self, name: str, params: dict[str, np.ndarray]) -> None:
        problems = []
        for pname, value in params.items():
            if pname not in self.slots:
                problems.append(f"{pname}: the graph has no such LoRA slot")
            elif [d if isinstance(d, int) else None for d in self.slots[pname]] != \
                    [v if isinstance(d, int) else None for d, v in zip(self.slots[pname], value.shape)]:
                problems.append(f"{pname}: shape {list(value.shape)} does not fit slot {self.slots[pname]}")
        if problems:
            raise AdapterMismatchError(f"adapter {name} does not fit this graph ({len(problems)} problems): {'; '.join(problems)}")

    @property
    def _binds_params(self) -> bool:
        """Slots filled by binding the parameters (the fused graph's IO binding, or grouped slots
        that an .onnx_adapter's per-module names do not fit) rather than by ONNX Runtime's adapters."""
        return self.shared_kv or self.grouped

    def _layout(self, params: dict[str, np.ndarray]) -> tuple[list, dict]:
        """An adapter's per-module parameters (`onnx_adapter.parameters`: the scale folded into B) as
        this graph's slot parameters, grouped slots laid out from them, each in its slot's type and
        layout (the float32 value stays in the store): (arrays kept alive, OrtValues)."""
        if self.grouped:
            params = onnx_fused.slot_parameters(params, self.config, self._slot_types)
        return list(params.values()), {k: self._ort.OrtValue.ortvalue_from_numpy(v) for k, v in params.items()}

    def _load_adapter(self, name: str, path: Path, adapter: LoraAdapter) -> None:
        from edgelora.converters.onnx_adapter import parameters

        params = parameters(adapter)  # the one place an adapter becomes slot parameters
        self._check_slots(name, params)
        self._mixes = {k: v for k, v in self._mixes.items() if name not in dict(k)}
        self._param_cache.pop(name, None)
        if self._binds_params:
            self._param_cache[name] = self._layout(params)
            return
        handle = self._ort.LoraAdapter()
        try:
            handle.Load(str(path))
        except Exception as e:
            raise AdapterError(f"onnxruntime could not load adapter {name} from {path}: {str(e).splitlines()[0]}") from e
        self._ort_adapters[name] = handle  # RunOptions does not keep it alive: we must

    def _adapter_params(self, name: str) -> dict:
        """The slot parameters of a loaded adapter as OrtValues (laid out when it was loaded)."""
        return self._param_cache[name][1]

    def _activate(self, weights: dict[str, float]) -> None:
        self._decode_io = None  # the decode binding holds the old setting's values
        if self._binds_params:
            self._keep = []
            if not weights:
                self._bound_params = {}
            elif len(weights) == 1 and next(iter(weights.values())) == 1.0:
                self._bound_params = dict(self._adapter_params(next(iter(weights))))
            else:
                from edgelora.converters.onnx_adapter import parameters

                mixed = LoraAdapter.mix([(self._adapters.values[n], w) for n, w in weights.items()])
                self._keep, self._bound_params = self._layout(parameters(mixed))
            return
        ro = self._ort.RunOptions()
        if len(weights) == 1 and next(iter(weights.values())) == 1.0:
            ro.add_active_adapter(self._ort_adapters[next(iter(weights))])
        elif weights:
            key = tuple(sorted(weights.items()))
            if key not in self._mixes:
                from edgelora.converters.onnx_adapter import parameters, write_parameters

                mixed = LoraAdapter.mix([(self._adapters.values[n], w) for n, w in weights.items()])
                path = Path(self._mix_dir.name) / f"mix{len(self._mixes)}.onnx_adapter"
                write_parameters(parameters(mixed), path)
                handle = self._ort.LoraAdapter()
                handle.Load(str(path))
                self._mixes[key] = handle
            ro.add_active_adapter(self._mixes[key])
        self._run_options = ro

    # -- merge ------------------------------------------------------------------------------

    def _merge(self, adapter: LoraAdapter, weight: float) -> None:
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(self.path))
        inits = {i.name: i for i in model.graph.initializer}
        graph = onnx_fused if self.shared_kv else onnx_model
        targets = graph.float_weights(model, self.config)
        for target in adapter.targets:
            if target not in targets or targets[target][0] not in inits or \
                    inits[targets[target][0]].data_type != onnx.TensorProto.FLOAT:
                raise EngineError(f"cannot merge into this ONNX base: {target} is not a float MatMul "
                                  "(quantized ONNX bases run adapters unmerged, in float; GGUF bases can merge)")
        for target in adapter.targets:
            name, col = targets[target]
            init = inits[name]
            w = numpy_helper.to_array(init).copy()  # [in, out] (several targets may share one, by columns)
            delta = np.float32(weight) * adapter.delta(target).T.astype(np.float32)
            w[:, col:col + delta.shape[1]] += delta
            if not np.isfinite(w).all():
                raise AdapterError(f"merging {adapter.name} makes {target} non-finite; refusing the merge")
            init.CopyFrom(numpy_helper.from_array(w, name))
        self.session = self._ort.InferenceSession(model.SerializeToString(), self._so, providers=self._providers)

    def _unmerge(self) -> None:
        self.session = self._base_session
        self._decode_io = None

    def _reset(self) -> None:
        self.past = self._empty_past() if not getattr(self, "shared_kv", False) else {}
        self.n_past = 0
        self._decode_io = None

    def _close(self) -> None:
        self.session = None
        self._base_session = None
        self._ort_adapters.clear()
        self._mixes.clear()
        self._mix_dir.cleanup()
