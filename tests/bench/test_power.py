"""nanoflow.bench.power: nvidia-smi's lines read, samples summed per window, the bench's line.
nvidia-smi itself runs only on the CUDA machines (the GPU runs exercise the sampler); here the
lines are the format it prints."""

from datetime import datetime

import pytest
import torch

from nanoflow.bench import report
from nanoflow.bench.power import PowerSampler, Sample, parse_sample, power_line, summarize


def test_parse_sample_reads_nvidia_smi_lines() -> None:
    s = parse_sample("2026/11/30 17:29:44.422, GPU-5f1c-77ab, 688.12, 700.00, 1615, Active\n")
    assert s == Sample(datetime(2026, 11, 30, 17, 29, 44, 422000).timestamp(), "5f1c-77ab", 688.12, 700.0,
                       1615.0, True)
    assert parse_sample("2026/11/30 17:29:44.422, GPU-5f1c, 78.30, 700.00, 345, Not Active").power_capped is False
    assert parse_sample("2026/11/30 17:29:44.422, GPU-5f1c, [N/A], 700.00, 345, Not Active") is None
    assert parse_sample("2026/11/30 17:29:44.422, GPU-5f1c, 78.3") is None  # cut short at exit


def test_summary_sums_the_gpus_and_prices_a_token() -> None:
    samples = [Sample(t, gpu, w, 700.0, mhz, capped) for t, gpu, w, mhz, capped in [
        (0.0, "a", 600.0, 1800.0, False), (0.5, "a", 700.0, 1600.0, True), (0.2, "b", 500.0, 1980.0, False),
        (0.7, "b", 500.0, 1980.0, False)]]
    p = summarize(samples, seconds=2.0, tokens=1000)
    assert p["gpus"] == 2 and p["samples"] == 4 and p["watts_per_gpu"] == [650.0, 500.0]
    assert p["watts"] == 1150.0 and p["limit_watts"] == 700.0 and p["power_capped"] == 0.25
    assert p["sm_mhz"] == pytest.approx((1800 + 1600 + 1980 * 2) / 4)
    assert p["joules_per_token"] == pytest.approx(1150.0 * 2.0 / 1000)
    assert summarize([], 2.0, 1000) is None
    line = power_line("nanoflow", p)
    assert line.startswith("power (nanoflow): 1,150 W mean over 2 GPUs (limit 700 W each)")
    assert "held back by the power cap in 25% of samples; 2.3000 J a token (0.4 tokens/J)" in line


def test_sampler_windows_and_cpu() -> None:
    sampler = PowerSampler(["GPU-a"])
    sampler.samples = [Sample(t, "a", 100.0 * t, 700.0, 1980.0, False) for t in (1.0, 2.0, 3.0, 4.0)]
    assert sampler.summary(1.5, 3.5)["watts"] == 250.0  # the samples inside the window only
    assert sampler.summary(5.0, 6.0) is None
    sampler.samples.append(Sample(2.5, "other", 900.0, 700.0, 1980.0, False))  # a GPU not ours: left out
    assert sampler.summary(1.5, 3.5)["watts"] == 250.0
    stranger = PowerSampler(["GPU-x"])  # no GPU matches its uuids: every GPU, and it says so
    stranger.samples = sampler.samples
    p = stranger.summary(1.5, 3.5)
    assert p["gpus"] == 2 and p["gpus_matched"] is False
    assert PowerSampler.for_devices(torch.device("cpu"), 1) is None


def test_bench_table_has_a_power_line_per_sampled_system() -> None:
    p = summarize([Sample(0.0, "a", 690.0, 700.0, 1650.0, True)], 1.0, 1000)
    system = {"status": "ok", "num_requests": 1, "elapsed_s": 1.0, "requests_per_s": 1.0, "total_tokens_per_s": 1.0,
              "output_tokens_per_s": 1.0, "power": p}
    result = {"model": {"name": "m", "architecture": "LlamaForCausalLM", "num_parameters": 1, "active_parameters": 1},
              "workload": {"name": "8x8", "num_requests": 1, "num_rows": 1, "num_skipped_too_long": 0,
                           "max_model_len": 64, "num_skipped_invalid": 0, "input_tokens": {"mean": 8},
                           "output_tokens": {"mean": 8}},
              "environment": {"device_name": "d", "torch": "t", "transformers": "x"},
              "settings": {"dtype_resolved": "bfloat16"}, "peak": None, "optimum_tokens_per_s": None,
              "systems": {"nanoflow": system, "nanoflow-sequential": {**system, "power": None}}}
    table = report.format_table(result)
    assert "power (nanoflow): 690 W mean over 1 GPU (limit 700 W each)" in table
    assert "power (nanoflow-sequential)" not in table
