"""Every key and file name edgelora writes into other tools' formats, in one place: the readers and
writers of each format, the store and the service import them from here.

Metadata keys are namespaced ``edgelora.`` so no tool mistakes them for its own. Files written before
the keys had one spelling are still read (`LEGACY_FINGERPRINT`).
"""

from __future__ import annotations

# -- metadata keys (GGUF key-value pairs, ONNX metadata_props, PEFT config and safetensors metadata)
FINGERPRINT = "edgelora.base_fingerprint"  # the base the file was made from / for
LEGACY_FINGERPRINT = ("edgelora_base_fingerprint", "edgelora_fingerprint")  # PEFT files and config.json, read only
PROVENANCE = "edgelora.provenance"  # JSON: how an adapter was made
LEGACY_PROVENANCE = ("edgelora_provenance",)
ROPE_SCALING = "edgelora.rope_scaling"  # GGUF: transformers' rope dict (llama.cpp keeps only its tensors)

# adapters: how a file's pairs map back to the adapter value
ADAPTER_ALPHAS = "edgelora.adapter.alphas"  # JSON {target: alpha}, present when a scale was folded into B
ADAPTER_RSLORA = "edgelora.adapter.rslora"
ADAPTER_HEADS = "edgelora.adapter.heads"  # [n_head, n_head_kv]: llama.cpp's q/k permutation, undone without the base
ADAPTER_FUSED_RANKS = "edgelora.adapter.fused_ranks"  # JSON {fused module: {member: [r0, r1]}}

# edgelora's fused ONNX graph
GRAPH = "edgelora.graph"  # "fused" for edgelora's own graph (optimum exports have none)
QUANT = "edgelora.quant"
ACCURACY_LEVEL = "edgelora.accuracy_level"
MAX_LEN = "edgelora.max_len"  # positions the RoPE caches hold
ENCODINGS = "edgelora.encodings"  # how many linears each weight encoding holds
LORA_PACK = "edgelora.lora_pack"  # JSON {"table": per lora_slot [A, B, ...], "inputs": {slot: [elem type, dims]}}

# -- file names
NPU_GEOMETRY = "npu.json"
NPU_PREFIX_KV = "prefix_kv.npz"
ADAPTER_FILES = {"gguf": "adapter.gguf", "onnx": "adapter.onnx_adapter"}  # an installed adapter, per backend
GGUF_ADAPTER_IN = "adapter.{precision}.gguf"  # what llama.cpp loads when the bundle's GGUF adapters are f16 or q8_0
GENAI_ADAPTER = "adapter.genai.onnx_adapter"  # an installed adapter in the fused graph's slot layout (onnxruntime-genai)
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


def fingerprint_of(meta: dict) -> str | None:
    """The base fingerprint a file's metadata records, under any spelling edgelora ever wrote."""
    for key in (FINGERPRINT, *LEGACY_FINGERPRINT):
        if meta.get(key):
            return meta[key]
    return None
