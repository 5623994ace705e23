"""nanoflow.bench.sync_calls: the synchronizing CUDA calls of a block, by call site, and the bench's line."""

import warnings

import pytest
import torch

from nanoflow.bench import sync_calls as sc


def test_off_a_gpu_nothing_is_recorded() -> None:
    with sc.sync_calls(torch.device("cpu")) as found, pytest.warns(UserWarning, match="synchronizing"):
        warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)
    assert found == {"count": 0, "sites": {}}
    assert sc.sync_line("nanoflow", found) is None


def test_torch_sync_warnings_are_counted_by_call_site(monkeypatch) -> None:
    # torch's sync debug mode, as a CPU build cannot run it: the warning text torch gives
    modes = ["off"]
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    with sc.sync_calls(torch.device("cuda")) as found:
        for _ in range(3):
            warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)
        with pytest.warns(UserWarning, match="other"):  # other warnings still reach their handler
            warnings.warn("other", UserWarning, stacklevel=1)
    assert modes[1:] == ["warn", 0]  # on inside the block, back to what it was after
    assert found["count"] == 3 and found["sites"] == {"outside nanoflow": 3}
    assert sc.sync_line("nanoflow", found) == "synchronizing calls (nanoflow): 3, most at outside nanoflow x3"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_an_item_on_the_gpu_is_caught() -> None:
    x = torch.ones(4, device="cuda")
    with sc.sync_calls(x.device) as found:
        x.sum().item()
    assert found["count"] >= 1
