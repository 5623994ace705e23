"""Arguments of `nanoflow bench` (kept apart so the CLI can build its parser without heavy imports)."""

from __future__ import annotations

import argparse


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="Hugging Face model folder")
