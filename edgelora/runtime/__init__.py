"""Engines: one interface over llama.cpp (GGUF) and ONNX Runtime (ONNX)."""
