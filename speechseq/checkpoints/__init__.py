"""Checkpoint I/O in one place: torch-free readers and the safetensors writer (readers), the weight tables used both
ways (table), Hugging Face save/load glue (hf), speechseq checkpoints and every atomic write (storage), and
convert / export / describe between the two layouts (convert)."""
