"""onnxruntime-genai's model directory: ``genai_config.json`` and the tokenizer files genai reads,
beside an ONNX decoder, so that ``og.Model(bundle/onnx/<quant>)`` (and the genai mobile APIs, which
take the same directory) load an edgelora bundle's graph as it is.

Facts this relies on (docs/research/onnxruntime-genai.md, measured with onnxruntime-genai 0.18):
- genai feeds ``input_ids``, ``attention_mask`` and ``past_key_values.%d.key/value`` and reads
  ``logits`` and ``present.%d.key/value`` (BNSH), the names both of edgelora's ONNX graphs use;
  ``position_ids`` only if the graph has it (the fused graph's GroupQueryAttention rotates itself).
- ``past_present_share_buffer`` needs an attention that writes into a max-length buffer in place:
  GroupQueryAttention (the fused graph), not the optimum export's.
- ``vocab_size`` is the logits' width (the embedding's rows), ``context_length`` at most the graph's
  RoPE cache (the fused graph's max_len: the profile's context).
- Adapters: og.Adapters hands an ``.onnx_adapter``'s tensors to ONNX Runtime as feeds of the same
  names, so they must match the graph's LoRA slots. The fused graph's slots are grouped (q|k|v,
  gate|up: `onnx_fused.GROUPS`; B per member and float16 in a MatMulQ41 graph), so genai needs the
  graph's own layout (`adapter_parameters`); several
  active adapters are not summed there (the last wins per name), so a mix is written as one adapter.
- Tokenizer: tokenizer.json and tokenizer_config.json (and chat_template.jinja) in the model
  directory itself (``tokenizer_dir`` exists only from genai 0.15).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgelora.adapters import LoraAdapter
from edgelora.arch import ModelConfig
from edgelora.tokenizer import Tokenizer

CONFIG = "genai_config.json"
# edgelora family (or model_type) -> genai's model.type; Gemma 3's text model is gemma3_text (gemma3 is
# genai's vision-language type)
TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
         "gemma3": "gemma3_text"}


def config(model_config: ModelConfig, tokenizer: Tokenizer, *, filename: str, context_length: int,
           share_buffer: bool, custom_ops_library: str | None = None) -> dict:
    """genai_config.json for a decoder graph `filename` (relative to the model directory); a graph
    with edgelora's operators names their library (beside it) in its session options."""
    c = model_config
    session_options = {"log_id": "edgelora", "provider_options": []}
    if custom_ops_library:
        session_options["custom_ops_library"] = custom_ops_library
    eos = tokenizer.eos_token_id
    pad = tokenizer.token_id(tokenizer.pad_token)
    return {
        "model": {
            "type": TYPES.get(c.model_type, TYPES[c.family]),
            "vocab_size": c.vocab_size,
            "context_length": context_length,
            "bos_token_id": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos,
            "eos_token_id": eos,
            "pad_token_id": pad if pad is not None else eos,
            "decoder": {
                "filename": filename,
                "head_size": c.head_dim,
                "hidden_size": c.hidden_size,
                "num_attention_heads": c.num_heads,
                "num_key_value_heads": c.num_kv_heads,
                "num_hidden_layers": c.num_layers,
                "session_options": session_options,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "max_length": context_length, "num_beams": 1, "num_return_sequences": 1,
                   "past_present_share_buffer": share_buffer, "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }


def write_model_dir(model_dir: Path, model_config: ModelConfig, tokenizer: Tokenizer, *, filename: str,
                    context_length: int, share_buffer: bool, custom_ops_library: str | None = None) -> None:
    """Writes genai_config.json and the tokenizer files into `model_dir`."""
    from .hf import write_tokenizer

    model_dir = Path(model_dir)
    cfg = config(model_config, tokenizer, filename=filename, context_length=context_length, share_buffer=share_buffer,
                 custom_ops_library=custom_ops_library)
    (model_dir / CONFIG).write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    write_tokenizer(tokenizer, model_dir)


def adapter_parameters(adapter: LoraAdapter, model_config: ModelConfig, slots: dict) -> dict[str, np.ndarray]:
    """The adapter's tensors under the names and in the types of a graph's LoRA slots
    (`onnx_fused.graph_slots`: the fused graph's grouped slots, an optimum graph's per-module ones)."""
    from .onnx_adapter import parameters
    from .onnx_fused import slot_parameters

    return slot_parameters(parameters(adapter), model_config, slots)


def write_adapter(adapter: LoraAdapter, path: Path, model_config: ModelConfig, slots: dict) -> Path:
    """An .onnx_adapter that og.Adapters loads onto the graph with LoRA slots `slots` (no manifest:
    genai reads none)."""
    from .onnx_adapter import write_parameters

    return write_parameters(adapter_parameters(adapter, model_config, slots), Path(path))
