"""`nanoflow bench`: offline throughput against the compute-bound optimum, HF generate and our eager mode."""
