"""The engine loop and what it drives: requests, the scheduler, the KV page pool, outputs."""
