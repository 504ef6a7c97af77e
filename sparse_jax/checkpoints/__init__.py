"""Checkpoint readers (Hugging Face folders, GGUF files) and the Orbax parameter cache."""
