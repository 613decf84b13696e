"""Readers for the weight files edgelm loads: Hugging Face safetensors folders, GGUF, llama2.c."""
