"""`nanoflow bench` takes `vllm bench throughput`'s flags: --input-len/--output-len, --num-prompts,
--dataset-name random|sharegpt|trace with --dataset-path, --output-json. Each resolves at the CLI edge
(nanoflow.cli.parse_args) into the same --workload spec (one path to the Workload); conflicts are
argparse errors (exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nanoflow.bench.cli_args import resolve_workload
from nanoflow.bench.workloads import build_workload
from nanoflow.cli import main, parse_args

REPO = Path(__file__).resolve().parents[2]
SHAREGPT = REPO / "benchmarks" / "data" / "sharegpt_lengths.csv"
SPLITWISE = REPO / "benchmarks" / "data" / "splitwise_azure_conv_2023.csv"
CPU_ARGS = ["--device", "cpu", "--dtype", "float32", "--num-kv-pages", "64", "--no-tqdm", "--peak-seconds", "0.05"]


def _parse(*argv: str):
    return parse_args(["bench", *argv])


@pytest.mark.parametrize(
    "argv, workload",
    [
        ([], "512x512"),  # the default, unchanged
        (["--input-len", "32", "--output-len", "16"], "32x16"),
        (["--input-len", "32"], "32x512"),  # the other length keeps --workload's default
        (["--output-len", "7"], "512x7"),
        (["--dataset-name", "random", "--input-len", "8", "--output-len", "4"], "8x4"),
        (["--dataset-name", "random"], "512x512"),
        (["--workload", "32x16", "--input-len", "32", "--output-len", "16"], "32x16"),  # agreeing: fine
        (["--workload", "32x16", "--dataset-name", "random"], "32x16"),
        (["--workload", "trace:x.csv"], "trace:x.csv"),  # --workload alone is not checked here
        (["--dataset-name", "sharegpt", "--dataset-path", str(SHAREGPT)], f"trace:{SHAREGPT}"),
        (["--dataset-name", "trace", "--dataset-path", str(SPLITWISE)], f"trace:{SPLITWISE}"),
    ],
)
def test_aliases_resolve_to_one_workload_spec(argv: list[str], workload: str) -> None:
    assert _parse(*argv).workload == workload


def test_num_prompts_is_num_requests() -> None:
    assert _parse("--num-prompts", "7").num_requests == 7
    assert _parse("--num-requests", "9").num_requests == 9


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--workload", "32x16", "--input-len", "33"], "--workload 32x16 conflicts with --input-len 33"),
        (["--workload", "32x16", "--output-len", "8"], "conflicts with --output-len 8"),
        (["--workload", "trace:x.csv", "--input-len", "8"], "--workload trace:x.csv conflicts with --input-len 8"),
        (["--workload", "trace:x.csv", "--dataset-name", "random"], "--dataset-name random makes fixed-length"),
        (
            ["--workload", "32x16", "--dataset-name", "trace", "--dataset-path", str(SPLITWISE)],
            "both choose the requests",
        ),
        (["--dataset-name", "sharegpt"], "--dataset-name sharegpt needs --dataset-path FILE"),
        (["--dataset-name", "trace"], "--dataset-name trace needs --dataset-path FILE"),
        (
            ["--dataset-name", "sharegpt", "--dataset-path", "ShareGPT_V3_unfiltered_cleaned_split.json"],
            "vLLM's ShareGPT JSON is not supported",
        ),
        (["--dataset-name", "trace", "--dataset-path", "missing.csv"], "--dataset-path missing.csv: no such file"),
        (
            ["--dataset-name", "sharegpt", "--dataset-path", str(SHAREGPT), "--output-len", "8"],
            "--input-len/--output-len set the lengths of --dataset-name random",
        ),
        (["--dataset-path", str(SHAREGPT)], "--dataset-path needs --dataset-name sharegpt or trace"),
        (["--dataset-name", "random", "--dataset-path", str(SHAREGPT)], "--dataset-path needs --dataset-name"),
        (["--dataset-name", "burstgpt"], "argument --dataset-name: invalid choice"),
        (["--input-len", "0"], "argument --input-len: must be at least 1, got 0"),
        (["--output-len", "many"], "argument --output-len: expected a whole number"),
        (["--output-json", "."], "--output-json '.' is not a file name"),
    ],
)
def test_conflicts_are_argparse_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        _parse(*argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.startswith("usage: nanoflow bench"), err


def test_argument_errors_come_before_any_heavy_import() -> None:
    """A conflict fails in the parser: the subprocess never imports torch (tests/test_fast_start.py)."""
    code = (
        "import sys\nfrom nanoflow.cli import main\n"
        "try:\n    main(['bench', '--workload', '32x16', '--input-len', '8'])\n"
        "except SystemExit as e:\n    print(e.code, 'torch' in sys.modules, 'numpy' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.stdout.split() == ["2", "False", "False"], r.stdout + r.stderr
    assert "conflicts with --input-len 8" in r.stderr


def test_sharegpt_dataset_reads_the_lengths_csv() -> None:
    """--dataset-name sharegpt builds the same Workload as --workload trace:FILE (one loader)."""
    spec = resolve_workload(None, None, None, "sharegpt", str(SHAREGPT))
    a = build_workload(spec, 50, vocab_size=1000, max_model_len=8192)
    b = build_workload(f"trace:{SHAREGPT}", 50, vocab_size=1000, max_model_len=8192)
    assert a.requests == b.requests and a.name == "trace-sharegpt_lengths" and a.num_rows == 50
    assert [len(p) for p, _ in a.requests[:3]] == [42, 19, 63]  # the CSV's first ContextTokens


@pytest.mark.parametrize(
    "argv, output_dir",
    [
        ([], "bench-results"),
        (["--output-json", "out/run.json"], "out"),  # the pictures go beside the JSON
        (["--output-json", "run.json"], "."),
        (["--output-json", "out/run.json", "--output-dir", "pics"], "pics"),
        (["--output-dir", "pics"], "pics"),
    ],
)
def test_output_json_sets_the_pictures_folder(argv: list[str], output_dir: str) -> None:
    assert _parse(*argv).output_dir == output_dir


def test_output_json_writes_exactly_there(
    bench_tiny_llama: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM's flags end to end: the JSON exactly at --output-json, the PNGs named after it beside
    it, nothing in the working directory (no ./bench-results)."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "deep" / "result.json"
    vllm_flags = ["--input-len", "8", "--output-len", "4", "--num-prompts", "2", "--output-json", str(out)]
    assert main(["bench", "--model", bench_tiny_llama, *vllm_flags, "--num-warmup", "1", *CPU_ARGS]) == 0
    result = json.loads(out.read_text())
    assert result["workload"]["name"] == "8x4" and result["workload"]["num_requests"] == 2
    assert result["systems"]["nanoflow"]["output_tokens"] == 2 * 4 and result["files"]["json"] == str(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["result.json", "result.png", "result_steps.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep"]
