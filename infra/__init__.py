"""Machinery every script needs and a first reading of the paper skips: the training loop and run directory
(trainer), data parallelism / FSDP2 and sharded checkpoints (parallel), checkpoint file layouts (checkpoint), atomic
writes (files), the per-GPU memory plan (memory)."""
