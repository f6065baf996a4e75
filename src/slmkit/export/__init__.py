"""Exporters: Hugging Face safetensors directories and GGUF files."""
