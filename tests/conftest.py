import os
import sys
from pathlib import Path

import pytest
import torch

# Triton chooses interpreted or compiled mode when first imported: decide before anything imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))
from helpers import ARCHS, tiny_models_root, write_model  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_model():
    """tiny_model(arch) -> path of a random checkpoint with a trained BPE tokenizer (cached per session)."""
    root = tiny_models_root()

    def make(arch: str = "llama") -> str:
        assert arch in ARCHS
        return str(write_model(root / arch, arch))

    return make
