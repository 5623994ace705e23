"""Reporting for `nanoflow bench`: the text table, the JSON file, the PNG chart, and a markdown
table over one or more result files (for docs/performance.md):

    python -m nanoflow.bench.report benchmarks/results/*.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

from nanoflow.bench.gc_pauses import gc_line
from nanoflow.bench.power import power_line
from nanoflow.bench.sync_calls import sync_line

Result = dict[str, Any]


# --- formatting helpers ------------------------------------------------------------------------
def _num(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def params_str(n: int | None) -> str:
    if n is None:
        return "-"
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _tflops(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}" if x >= 10 else f"{x:.3g}"


def _ok(s: dict[str, Any]) -> bool:
    return s.get("status") == "ok"


def _align(rows: list[list[str]], right: Sequence[bool]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    def cell(i: int, text: str) -> str:
        return text.rjust(widths[i]) if right[i] else text.ljust(widths[i])

    return ["  ".join(cell(i, c) for i, c in enumerate(r)).rstrip() for r in rows]


def peak_line(result: Result) -> str:
    peak = result.get("peak")
    if not peak:
        return "peak GEMM rate: not measured (no fraction of the optimum)"
    if peak.get("kind") == "given":
        src = "given on the command line"
    else:
        src = (f"{peak['dtype']} {peak['n']}^3 matmul, median of {peak['samples']} samples over "
               f"{peak['seconds']:g} s after warm-up")
        if peak.get("kind") == "cpu-small":
            src += "; a small CPU measurement, not a real ceiling"
    return (f"peak GEMM rate: {peak['tflops']:.1f} TFLOP/s ({src}) -> optimum "
            f"{_num(result.get('optimum_tokens_per_s'))} tokens/s")


def pipeline_line(name: str, pipeline: list[dict[str, Any]] | str) -> str:
    """Which nano-batch pipeline an engine system ran: its schedules, or "sequential"."""
    if isinstance(pipeline, str):
        return f"pipeline ({name}): {pipeline}"

    def schedule(s: dict[str, Any]) -> str:
        splits = ", ".join(f"{len(v) - 1} {k} nano-batch" + (f"es split at {'/'.join(map(str, v[1:-1]))}"
                                                              if len(v) > 2 else "")
                           for k, v in s["partitions"].items())
        caps = f", decode attention on {'/'.join(map(str, s['decode_ctas']))} SMs" if s.get("decode_ctas") else ""
        units = f", on units of {'/'.join(map(str, s['units']))} SMs" if s.get("units") else ""
        predicted = f", predicted {s['predicted_ms']:.2f} ms" if s.get("predicted_ms") is not None else ""
        streams = "1 stream" if s["num_streams"] == 1 else f"{s['num_streams']} streams"
        return f"{s['min_tokens']}-{s['max_tokens']} tokens ({splits}, {streams}{caps}{units}{predicted})"

    return f"pipeline ({name}): " + "; ".join(map(schedule, pipeline))


# --- text table --------------------------------------------------------------------------------
def format_table(result: Result) -> str:
    m, w, env = result["model"], result["workload"], result["environment"]
    lines = [
        f"model: {m['name']} ({'random weights' if m.get('load_format') == 'dummy' else 'checkpoint'}), "
        f"{m['architecture']}, {params_str(m['num_parameters'])} parameters, "
        f"{params_str(m['active_parameters'])} active",
        f"workload: {w['name']}: {w['num_requests']} requests (of {w['num_rows']}; skipped "
        f"{w['num_skipped_too_long']} over max_model_len={w['max_model_len']}, {w['num_skipped_invalid']} "
        f"empty), input mean {w['input_tokens']['mean']:g}, output mean {w['output_tokens']['mean']:g}",
        f"device: {env['device_name']} | torch {env['torch']} | triton {env.get('triton') or '-'} | "
        f"transformers {env['transformers']} | dtype {result['settings']['dtype_resolved']}",
        peak_line(result),
    ]
    for name, s in result["systems"].items():
        kv = s.get("kv_pool")
        if kv:
            lines.append(f"KV pool ({name}): {kv['pages']:,} pages = {kv['tokens']:,} tokens = "
                         f"{kv['gib']:.2f} GiB")
        if s.get("pipeline"):
            lines.append(pipeline_line(name, s["pipeline"]))
    header = ["system", "requests", "elapsed s", "req/s", "total tok/s", "output tok/s", "% optimum",
              "peak GiB", "preemptions"]
    rows = [header]
    for name, s in result["systems"].items():
        if not _ok(s):
            rows.append([name, "error", "-", "-", "-", "-", "-", "-", "-"])
            continue
        preempt = s.get("num_preemptions")
        rows.append([
            name, str(s["num_requests"]), _num(s["elapsed_s"], 2 if s["elapsed_s"] < 10 else 1),
            _num(s["requests_per_s"], 2), _num(s["total_tokens_per_s"]), _num(s["output_tokens_per_s"]),
            _pct(s.get("fraction_of_optimum")), _num(s.get("peak_memory_gib"), 1),
            "-" if preempt is None else str(preempt),
        ])
    lines.append("")
    lines.extend(_align(rows, [False] + [True] * (len(header) - 1)))
    for name, s in result["systems"].items():
        if not _ok(s):
            lines.append(f"{name} failed: {s.get('error', '?')}")
        elif s.get("timeline", {}).get("error"):
            lines.append(f"{name} timeline failed: {s['timeline']['error']}")
        elif name in ("hf", "hf-mean"):
            batches = f"{s['num_batches']} batch{'es' if s['num_batches'] != 1 else ''}"
            lines.append(f"{name}: {batches} of up to {s['batch_size']}, {s['padding_efficiency']:.0%} of the "
                         f"computed tokens real ({s['note']})")
    lines.extend(power_line(name, s["power"]) for name, s in result["systems"].items() if s.get("power"))
    lines.extend(line for name, s in result["systems"].items()
                 if s.get("gc") and (line := gc_line(name, s["gc"], s.get("gc_heap"))))
    lines.extend(line for name, s in result["systems"].items()
                 if s.get("sync_calls") and (line := sync_line(name, s["sync_calls"])))
    if result.get("speedups"):
        lines.append("speedup: " + ", ".join(f"{k} {v:.2f}x" for k, v in result["speedups"].items()))
    systems = result["systems"]
    # the run's own (run_bench stores it); computed here for files written before it did
    agreement = result.get("agreement") or output_agreement(systems)
    lines.extend(agreement_line(n, a) for n, a in agreement.items())
    if self_comparison(systems):
        lines.append(SELF_COMPARISON)
    return "\n".join(lines)


# output tokens per request the bench keeps (run_engine's "output_heads") to compare engine runs
OUTPUT_HEAD = 8


def output_agreement(systems: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per engine run beside nanoflow: of the requests both completed, the share whose greedy output
    starts with nanoflow's first token, with its first OUTPUT_HEAD, and with its first k for each k
    (`by_position`). The same weights and prompts give the same greedy tokens up to rounding (a
    nano-batch's GEMMs have other shapes than the whole batch's), and rounding parts runs a few
    requests at a time, token after token: on random weights, whose logits are near-tied, ~10% of
    the requests a token (H200, 2026-11-30: 0.95, 0.84, 0.75 ... 0.41 over 8 tokens, ping-pong against
    sequential). A fast path that skips or garbles work parts them at once, at the first token it
    touches, which throughput alone does not show (the gated decode kernel of 2026-11-30 left one
    nano-batch's attention undone while the bench reported a 1.28x gain)."""
    ref = systems.get("nanoflow", {}).get("output_heads")
    agreement: dict[str, dict[str, Any]] = {}
    for name, s in systems.items():
        heads = s.get("output_heads")
        if name == "nanoflow" or not ref or not heads or len(heads) != len(ref):
            continue
        pairs = [(a, b) for a, b in zip(ref, heads, strict=True) if a and b]
        if pairs:
            n = min(min(len(a), len(b)) for a, b in pairs)
            by_position = [sum(a[:k] == b[:k] for a, b in pairs) / len(pairs) for k in range(1, n + 1)]
            agreement[name] = {"requests": len(pairs),
                               "first_token": sum(a[0] == b[0] for a, b in pairs) / len(pairs),
                               "first_tokens": sum(a == b for a, b in pairs) / len(pairs),
                               "by_position": by_position}
    return agreement


def agreement_line(name: str, a: dict[str, Any]) -> str:
    line = (f"outputs: {name} starts as nanoflow in {a['first_token']:.1%} of {a['requests']} requests "
            f"(first token), {a['first_tokens']:.1%} (first {OUTPUT_HEAD})")
    if a["first_tokens"] < 0.5:
        kept = [y / x for x, y in itertools.pairwise(a.get("by_position", [])) if x > 0]
        if a["first_token"] < 0.5 or (kept and min(kept) < 0.7):
            line += "; most part ways at once: one of the two runs computes something else"
        else:
            line += (f"; they part a few at a time ({min(kept, default=1):.0%} or more of those still alike stay "
                     "alike a token), as rounding does where logits are near-tied (random weights)")
    return line


SELF_COMPARISON = ("note: nanoflow ran the sequential schedule too (no pipeline tuned for this GPU, model, dtype, "
                   "KV dtype, TP size and token budget: `nanoflow tune` with the same engine flags finds one), "
                   "so nanoflow/nanoflow-sequential compares the schedule with itself")


def self_comparison(systems: dict[str, Any]) -> bool:
    """Whether --compare nanoflow-sequential measures the sequential schedule against itself."""
    return "nanoflow-sequential" in systems and systems.get("nanoflow", {}).get("pipeline") == "sequential"


# --- files ---------------------------------------------------------------------------------------
def write_json(result: Result, path: str) -> None:
    """Write-then-rename, since the bench rewrites the file after every system: a run killed by a
    timeout leaves the systems it finished, never a truncated file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".json.tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(result, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)


def plot_result(result: Result, path: str) -> None:
    """Bar chart of total tokens/s per system, the optimum as a dashed line, % of it on each bar."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    systems = [(n, s) for n, s in result["systems"].items() if _ok(s)]
    optimum = result.get("optimum_tokens_per_s")
    fig, ax = plt.subplots(figsize=(max(4.5, 1.6 * len(systems) + 2), 4.5))
    names = [n for n, _ in systems]
    rates = [s["total_tokens_per_s"] for _, s in systems]
    colors = {"nanoflow": "#2a7ab0", "nanoflow-fp8": "#1d5580", "nanoflow-sequential": "#5b95bf",
              "sequential": "#8fb9d6", "hf": "#c9a03d", "hf-mean": "#e3c98a"}
    bars = ax.bar(names, rates, color=[colors.get(n, "#888888") for n in names])
    top = max(rates + ([optimum] if optimum else []) + [1.0])
    for bar, (_, s) in zip(bars, systems, strict=True):
        label = f"{s['total_tokens_per_s']:,.0f}"
        if s.get("fraction_of_optimum") is not None:
            label += f"\n{100 * s['fraction_of_optimum']:.1f}% of optimum"
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.01 * top, label, ha="center",
                va="bottom", fontsize=9)
    if optimum:
        peak = result["peak"]
        ax.axhline(optimum, linestyle="--", color="#b03a2e", linewidth=1.2,
                   label=f"optimum {optimum:,.0f} tok/s (peak {peak['tflops']:.3g} TFLOP/s"
                   + (", small CPU GEMM)" if peak.get("kind") == "cpu-small" else ")"))
        ax.legend(loc="upper right", fontsize=8)
    ax.set_ylim(0, top * 1.22)
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.set_ylabel("total tokens/s (input + output)")
    m, w, env = result["model"], result["workload"], result["environment"]
    ax.set_title(f"{m['name']}, {w['name']}, {w['num_requests']} requests\n{env['device_name']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_steps(result: Result, path: str, system: str = "nanoflow") -> bool:
    """Per-step view of one engine run over its GPU time: tokens and decodes per step (does the
    dense budget stay full?) and GPU ms per step. False when the run kept no timeline."""
    tl = result["systems"].get(system, {}).get("step_timeline")
    if not tl or not tl.get("tokens"):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, clock = [], 0.0
    for busy, idle in zip(tl["gpu_busy_ms"], tl["gpu_idle_ms"], strict=True):
        clock += (busy + idle) / 1000
        t.append(clock)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    top.plot(t, tl["tokens"], linewidth=0.7, label="tokens per step", color="#2a7ab0")
    top.plot(t, tl["decodes"], linewidth=0.7, label="decodes per step", color="#c9a03d")
    top.plot(t, tl["running"], linewidth=0.7, label="running sequences", color="#6a9a4a")
    top.set_ylabel("count")
    top.legend(loc="upper right", fontsize=8)
    bottom.plot(t, tl["gpu_busy_ms"], linewidth=0.7, color="#2a7ab0", label="GPU ms per step")
    bottom.set_ylabel("GPU ms per step")
    bottom.set_xlabel("GPU time (s)")
    m, w = result["model"], result["workload"]
    top.set_title(f"{system}: {m['name']}, {w['name']}, {w['num_requests']} requests", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# --- markdown over several results ---------------------------------------------------------------
BASELINES = ("hf", "hf-mean", "sequential", "nanoflow-sequential")
MD_HEADER = ["model", "workload", "device", "system", "requests", "total tok/s", "output tok/s",
             "% of optimum", *(f"vs {b}" for b in BASELINES), "peak TFLOP/s", "date"]


def markdown_rows(result: Result) -> Iterable[list[str]]:
    peak = result.get("peak") or {}
    base = {n: s["total_tokens_per_s"] for n, s in result["systems"].items() if _ok(s)}
    for name, s in result["systems"].items():
        if not _ok(s):
            continue
        rate = s["total_tokens_per_s"]
        yield [
            result["model"]["name"], result["workload"]["name"], result["environment"]["device_name"], name,
            str(s["num_requests"]), _num(rate), _num(s["output_tokens_per_s"]),
            _pct(s.get("fraction_of_optimum")),
            *(f"{rate / base[b]:.2f}x" if b in base and name != b else "-" for b in BASELINES),
            _tflops(peak.get("tflops")) + (" (cpu)" if peak.get("kind") == "cpu-small" else ""),
            result["timestamp"][:10],
        ]


def markdown_table(results: Sequence[Result]) -> str:
    lines = ["| " + " | ".join(MD_HEADER) + " |", "|" + "---|" * len(MD_HEADER)]
    for r in results:
        lines.extend("| " + " | ".join(row) + " |" for row in markdown_rows(r))
    return "\n".join(lines)


def load_results(paths: Sequence[str]) -> list[Result]:
    results = []
    for p in paths:
        with open(p) as f:
            results.append(json.load(f))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nanoflow.bench.report",
                                description="markdown table of nanoflow bench result JSON files")
    p.add_argument("files", nargs="+", help="bench_*.json files")
    p.add_argument("--plot", action="store_true",
                   help="also (re)draw the PNG beside each JSON (e.g. for a run cut short by a timeout)")
    args = p.parse_args(argv)
    results = load_results(args.files)
    print(markdown_table(results))
    if args.plot:
        for path, result in zip(args.files, results, strict=True):
            png = os.path.splitext(path)[0] + ".png"
            plot_result(result, png)
            print(f"wrote {png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
