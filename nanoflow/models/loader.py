"""Build a model from a Hugging Face folder: config via transformers, weights via safetensors."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from nanoflow.layers.linear import LazyTensor
from nanoflow.layers.parallel import ParallelState
from nanoflow.model_arch import ModelArch
from nanoflow.models.registry import model_class


def safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        missing = [n for n in names if not os.path.isfile(os.path.join(path, n))]
        if missing:
            raise ValueError(f"{index} names shard files that are missing: {', '.join(missing)}")
        return [os.path.join(path, n) for n in names]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        found = ", ".join(sorted(os.listdir(path))) or "nothing"
        raise ValueError(f"no .safetensors weights in {path!r} (found: {found}); nanoflow loads safetensors "
                         "checkpoints (re-save others with transformers' save_pretrained)")
    return [os.path.join(path, f) for f in files]


def iter_safetensors(files: list[str], progress: bool = True) -> Iterator[tuple[str, LazyTensor]]:
    """(name, LazyTensor) for every checkpoint tensor: nothing is read until the model copies a
    (rank's) slice of it, so a tensor-parallel rank reads only its own shards from the files."""
    for file in tqdm(files, desc="Loading safetensors shards", disable=not progress or len(files) < 2):
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, LazyTensor(f.get_slice(name))


def build_model(
    path: str,
    arch: ModelArch,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    par: ParallelState | None = None,
    enforce_eager: bool = True,
    dummy: bool = False,
    seed: int = 0,
) -> torch.nn.Module:
    """enforce_eager: PyTorch reference ops (False: the Triton kernels, also on the CPU under
    TRITON_INTERPRET=1); dummy: random weights of the checkpoint's shapes instead of its safetensors."""
    with torch.device(device):
        model = model_class(arch)(arch, dtype, max_positions, par, enforce_eager)
    if dummy:
        _init_random(model, seed)
    else:
        model.load_weights(iter_safetensors(safetensors_files(path), progress=par is None or par.rank == 0))
    return model.eval()


def _init_random(model: torch.nn.Module, seed: int) -> None:
    """Random weights with the checkpoint's shapes: same arithmetic as the real model, for benchmarks."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("layernorm.weight") or name == "norm.weight":
            p.data.fill_(1.0)
        else:
            p.data.normal_(0.0, 0.02, generator=gen)
