"""The frozen base as the device holds it: compact, expanded one layer at a time.

`CompactWeights` is the mapping the trainer reads (canonical name -> float32 array). The linear
weights stay in the bundle's own encoding, blocks of 32 along the input dimension:

    w[n, 32 b + j] = (q[n, b, j] - zero[n, b]) * scale[n, b] + offset[n, b]

(GGUF Q8_0, Q4_0 and Q4_1 blocks, and the fused ONNX graph's MatMulNBits int4/int8 blocks and its
exact-Q4_1 offsets, all fit this form; F16 stays half), and the layer asked for is expanded to
float32 on first use; the last `keep_layers` expanded layers are kept, the rest dropped. Norms are
kept expanded; the embedding and LM head, when stored in such blocks, stay in them as `BlockRows`
(the lookup expands the rows it gathers, the LM head a chunk of rows at a time) unless every layer
is expanded for good (`materialize`). GGUF codes are views of the mapped file, not copies.
Other GGUF types (K-quants...) keep their raw blocks and are expanded by `gguf` itself.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from edgelora import naming
from edgelora.arch import ModelConfig
from edgelora.converters.blocks import BLK, BlockQuant, BlockRows, Stored
from edgelora.errors import UnsupportedFormatError

LINEARS = ("q", "k", "v", "o", "gate", "up", "down")


class CompactWeights(Mapping):
    """Canonical name -> float32 array; per-layer linears expanded on demand, `keep_layers` kept.

    Expanded layers live in reused buffers: an array of layer i stays valid until `keep_layers`
    other layers have been asked for (the trainer works one layer at a time). `expanded()` copies."""

    def __init__(self, config: ModelConfig, dense: dict[str, np.ndarray | BlockRows], packed: dict[str, BlockQuant | Stored],
                 *, keep_layers: int = 2, source: str = ""):
        self.config, self.dense, self.packed, self.keep_layers, self.source = config, dense, packed, keep_layers, source
        self._cache: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._names = list(dense) + list(packed)

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self.dense:
            return self.dense[name]
        if name not in self.packed:
            raise KeyError(name)
        layer = int(name.split(".")[1])
        hit = self._cache.get(layer)
        if hit is None:
            free = {}
            while len(self._cache) >= self.keep_layers:  # the least recently used layer's buffers are reused
                free = self._cache.popitem(last=False)[1]
            hit = {}
            for kind in LINEARS:
                n = f"layers.{layer}.{kind}"
                if n in self.packed:
                    buf = free.get(kind)
                    hit[kind] = self.packed[n].expand(buf if buf is not None and buf.shape == self._shape(n) else None)
            self._cache[layer] = hit
        else:
            self._cache.move_to_end(layer)
        return hit[name.rsplit(".", 1)[1]]

    def _shape(self, name: str) -> tuple[int, int]:
        p = self.packed[name]
        return p.shape if isinstance(p, BlockQuant) else p.array.shape if p.array is not None else self.config.shapes()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self.dense or name in self.packed

    @property
    def nbytes(self) -> int:
        """Bytes held: the compact linears, embedding and head, and the norms (not the cache)."""
        return sum(p.nbytes for p in self.packed.values()) + sum(a.nbytes for a in self.dense.values())

    @property
    def tables_nbytes(self) -> int:
        """What the embedding and head kept in blocks would take expanded to float32."""
        return sum(4 * t.shape[0] * t.shape[1] for t in self.dense.values() if isinstance(t, BlockRows))

    def materialize(self, tables: bool = True) -> None:
        """Expands every layer for good, and with `tables` the embedding and head, freeing each
        compact tensor as it goes (when the memory cap allows every layer expanded, holding both
        forms would only cost memory)."""
        self._cache.clear()
        for name, table in self.dense.items():
            if tables and isinstance(table, BlockRows):
                self.dense[name] = table.blocks.expand()
        for name in list(self.packed):
            self.dense[name] = self.packed.pop(name).expand()
        self.keep_layers = self.config.num_layers

    def expanded(self) -> dict[str, np.ndarray]:
        return {n: np.array(self[n], copy=True) for n in self}


# -- GGUF --------------------------------------------------------------------------------------

def _f16(raw: np.ndarray) -> np.ndarray:
    """(.., 2) bytes -> (..) float32: a copy (1/17 of a Q8_0 tensor's bytes), as numpy multiplies
    by a float16 operand about 3x slower than by a float32 one."""
    return raw.view(np.float16)[..., 0].astype(np.float32)


def _gguf_blocks(t: Any, shape: tuple[int, int]) -> BlockQuant | None:
    """GGUF Q8_0 / Q4_0 / Q4_1 tensor -> BlockQuant whose codes are strided views into the mapped
    file (the file's pages are their only copy; the scales are copied), or None for other types."""
    n, k = shape
    name = t.tensor_type.name
    raw = np.asarray(t.data).reshape(n, -1)
    if name == "Q8_0":  # per block: f16 d, 32 x int8
        b = raw.reshape(n, k // BLK, 34)
        return BlockQuant(shape, b[..., 2:].view(np.int8), 8, _f16(b[..., :2]))
    if name == "Q4_0":  # f16 d, 16 bytes: element j in the low nibble of byte j, element 16 + j in the high
        b = raw.reshape(n, k // BLK, 18)
        return BlockQuant(shape, b[..., 2:], 4, _f16(b[..., :2]), 8.0, halves=True)
    if name == "Q4_1":  # f16 d, f16 m, 16 bytes as Q4_0
        b = raw.reshape(n, k // BLK, 20)
        return BlockQuant(shape, b[..., 4:], 4, _f16(b[..., :2]), 0.0, _f16(b[..., 2:4]), halves=True)
    return None


def from_gguf(path: str | os.PathLike, *, keep_layers: int = 2) -> CompactWeights:
    """A base-model GGUF's weights, linears kept in their quantized blocks (F16 as half)."""
    from edgelora.converters import gguf_model

    reader = gguf_model.open_reader(path)
    base = gguf_model.read(path, reader=reader)  # validates the file and gives the config
    cfg = base.config
    dense, packed = {}, {}
    files, shapes = naming.layout(cfg, "gguf"), cfg.shapes()
    for t in reader.tensors:
        members = files.get(t.name)
        if members is None:
            continue
        kind = members[0].rsplit(".", 1)[-1]
        shape = tuple(int(s) for s in reversed(t.shape))
        p = _gguf_blocks(t, shape) if len(shape) == 2 and shape[1] % BLK == 0 else None
        if not members[0].startswith("layers.") or kind not in LINEARS:
            table = members[0] in ("embed", "lm_head") and p is not None
            dense[members[0]] = BlockRows(p) if table else np.ascontiguousarray(base.weights[members[0]], np.float32)
            continue
        r0 = 0
        for canon in members:  # a fused tensor (Phi-3's attn_qkv) holds its members' rows in order
            n = shapes[canon][0]
            heads = naming.gguf_permutes(cfg, canon)
            rows = r0 + (naming.rope_unpermute(np.arange(n), heads) if heads else np.arange(n))
            whole = len(members) == 1 and heads is None
            r0 += n
            if p is not None:
                packed[canon] = p if whole else p.rows(rows)
            elif t.tensor_type.name in ("F16", "F32"):
                a = np.asarray(t.data).reshape(shape)
                packed[canon] = Stored(np.ascontiguousarray(a if whole else a[rows]))
            else:
                packed[canon] = Stored(load=(lambda n=canon: base.weights[n]))  # other types: gguf expands them
    return CompactWeights(cfg, dense, packed, keep_layers=keep_layers, source=str(path))


# -- ONNX (edgelora's fused graph) -------------------------------------------------------------

def from_onnx_fused(path: str | os.PathLike, config: ModelConfig, *, keep_layers: int = 2) -> CompactWeights:
    """The fused ONNX graph's weights, read from its initializers in their MatMulNBits encoding."""
    from edgelora.converters import onnx_fused

    dense, packed = onnx_fused.read_weights(path, config)
    return CompactWeights(config, dense, packed, keep_layers=keep_layers, source=str(path))


def for_bundle(bundle, backend: str | None = None, *, keep_layers: int = 2) -> tuple[CompactWeights, str]:
    """The compact weights of a bundle's artifact (GGUF preferred) and the backend they came from."""
    arts = {a.backend: a for a in bundle.artifacts}
    backend = backend or ("gguf" if "gguf" in arts else "onnx" if "onnx" in arts else None)
    if backend not in arts:
        raise UnsupportedFormatError(f"{bundle.root} has no {backend or 'GGUF or ONNX'} artifact to train against "
                                     f"(it has {', '.join(arts)})")
    art = arts[backend]
    if art.quant == "qdq":
        raise UnsupportedFormatError(f"{bundle.root}: NPU (QDQ) graphs cannot be trained against; export a CPU bundle")
    bundle.verify(art.files)  # a corrupt base would train on garbage and fail only at the end
    path = bundle.path(art.main)
    if backend == "gguf":
        return from_gguf(path, keep_layers=keep_layers), backend
    return from_onnx_fused(Path(path), bundle.config, keep_layers=keep_layers), backend
