from __future__ import annotations

from pathlib import Path

import pytest

from nanoflow.bench.workloads import DEFAULT_NUM_REQUESTS, build_workload, parse_workload_spec, read_trace

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("spec, want", [("512x512", (512, 512)), ("1024x512", (1024, 512)),
                                        ("512x1024", (512, 1024)), ("32x16", (32, 16)), (" 7x1 ", (7, 1))])
def test_fixed_specs(spec: str, want: tuple[int, int]) -> None:
    assert parse_workload_spec(spec) == ("fixed", want)


@pytest.mark.parametrize("spec", ["512", "0x16", "16x0", "axb", "512x512x2", "trace:", "sharegpt", ""])
def test_bad_specs(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_workload_spec(spec)


def test_fixed_workload_is_seeded_and_in_vocab() -> None:
    a = build_workload("32x16", 5, vocab_size=100, max_model_len=256, seed=3)
    b = build_workload("32x16", 5, vocab_size=100, max_model_len=256, seed=3)
    c = build_workload("32x16", 5, vocab_size=100, max_model_len=256, seed=4)
    assert a.requests == b.requests and a.requests != c.requests
    assert a.name == "32x16" and a.kind == "fixed" and len(a.requests) == 5
    assert all(len(p) == 32 and o == 16 and all(0 <= t < 100 for t in p) for p, o in a.requests)
    s = a.summary()
    assert (s["total_input_tokens"], s["total_output_tokens"], s["num_skipped_too_long"]) == (160, 80, 0)


def test_fixed_default_count_and_too_long() -> None:
    wl = build_workload("2x1", None, vocab_size=10, max_model_len=None)
    assert len(wl.requests) == DEFAULT_NUM_REQUESTS
    with pytest.raises(ValueError, match="no request that fits"):
        build_workload("200x100", 4, vocab_size=10, max_model_len=256)


def test_warmup_requests_are_fresh_prompts() -> None:
    wl = build_workload("16x64", 4, vocab_size=1000, max_model_len=256)
    warm = wl.warmup_requests(3, max_tokens=8)
    assert [(len(p), o) for p, o in warm] == [(16, 8)] * 3
    assert not {tuple(p) for p, _ in warm} & {tuple(p) for p, _ in wl.requests}


def test_trace_skips_and_counts(trace_csv: Path) -> None:
    wl = build_workload(f"trace:{trace_csv}", None, vocab_size=50, max_model_len=256)
    assert wl.kind == "trace" and wl.name == "trace-trace" and wl.source == str(trace_csv)
    assert [(len(p), o) for p, o in wl.requests] == [(40, 8), (12, 30), (100, 100), (7, 1)]
    assert (wl.num_rows, wl.num_skipped_too_long, wl.num_skipped_invalid) == (6, 1, 1)
    s = wl.summary()
    assert s["num_requests"] == 4 and s["input_tokens"]["max"] == 100 and s["output_tokens"]["min"] == 1
    # The first N rows, then skipping: N=2 keeps one request and counts the long one.
    wl2 = build_workload(f"trace:{trace_csv}", 2, vocab_size=50, max_model_len=256)
    assert [(len(p), o) for p, o in wl2.requests] == [(40, 8)] and wl2.num_skipped_too_long == 1
    # Without a length limit nothing is too long.
    unlimited = build_workload(f"trace:{trace_csv}", None, vocab_size=50, max_model_len=None)
    assert unlimited.num_skipped_too_long == 0


def test_trace_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        build_workload(f"trace:{tmp_path / 'missing.csv'}", None, 10, 100)
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="ContextTokens"):
        read_trace(str(bad))
    nonint = tmp_path / "nonint.csv"
    nonint.write_text("ContextTokens,GeneratedTokens\n1,x\n")
    with pytest.raises(ValueError, match="non-integer"):
        read_trace(str(nonint))
    empty = tmp_path / "empty.csv"
    empty.write_text("ContextTokens,GeneratedTokens\n")
    with pytest.raises(ValueError, match="no rows"):
        build_workload(f"trace:{empty}", None, 10, 100)


def _real_traces() -> list[Path]:
    names = ("splitwise_azure_conv_2023.csv", "sharegpt_lengths.csv")
    folders = (REPO / "benchmarks" / "data", REPO.parent / "shared" / "data")
    return [f / n for f in folders for n in names]


@pytest.mark.parametrize("path", _real_traces(), ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_real_trace_files(path: Path) -> None:
    if not path.is_file():
        pytest.skip(f"{path} is not here")
    wl = build_workload(f"trace:{path}", 300, vocab_size=32000, max_model_len=8192)
    assert wl.num_rows == 300
    assert len(wl.requests) + wl.num_skipped_too_long + wl.num_skipped_invalid == 300
    assert len(wl.requests) >= 290
    assert 10 < wl.summary()["input_tokens"]["mean"] < 5000


def test_committed_heads_match_shared_traces() -> None:
    """benchmarks/data holds the first 2,000 rows of the shared traces, unchanged."""
    for committed, shared in zip(_real_traces()[:2], _real_traces()[2:], strict=True):
        if not (committed.is_file() and shared.is_file()):
            pytest.skip("shared traces are not beside this checkout")
        head = read_trace(str(committed))
        assert len(head) == 2000 and head == read_trace(str(shared), 2000)
