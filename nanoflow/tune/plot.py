"""The tune's chart: per token bucket, the measured whole forward of the sequential schedule, of every
candidate the measured check tried, and of the one kept, drawn from the search JSON (one GPU) or
the tensor-parallel tune's report."""

from __future__ import annotations

from typing import Any


def plot_search(report: dict[str, Any], path: str, title: str, ylabel: str = "ms per forward (measured)") -> bool:
    """Draws report (a tune-search JSON) to path; False (nothing drawn) where the check measured
    nothing, as on a run with --no-verify."""
    cands = {int(k): v for k, v in (report.get("measured_candidates_ms") or {}).items()}
    seq = {n: ms["sequential"] for n, ms in cands.items() if "sequential" in ms}
    if not seq:
        return False
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    chosen = {int(k): ms for k, ms in (report.get("measured_ms") or {}).items()}
    tops = sorted(seq)
    fig, (ax, gain) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True, height_ratios=(2, 1))
    for n in tops:
        others = [ms for name, ms in cands[n].items() if name != "sequential"]
        ax.scatter([n] * len(others), others, s=12, color="#bbbbbb", zorder=1,
                   label="candidates tried" if n == tops[0] else None)
    ax.plot(tops, [seq[n] for n in tops], "o-", color="#5b95bf", label="sequential schedule", zorder=2)
    kept = [n for n in tops if n in chosen]
    ax.plot(kept, [chosen[n] for n in kept], "o-", color="#d2691e", label="pipeline kept", zorder=3)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    work = report.get("measured_workload") or {}
    if work.get("budget_decodes") and work.get("budget") in seq:  # --decode-fraction serve: a serving step
        ax.annotate(f"a mixed step: {work['budget_decodes']} decodes + prompt chunks", (work["budget"],
                    seq[work["budget"]]), textcoords="offset points", xytext=(0, -75), ha="right", fontsize=8,
                    arrowprops={"arrowstyle": "-", "color": "#888888"})
    widths = [0.6 * _gap(tops, i) for i in range(len(tops))]
    gain.bar(tops, [seq[n] / chosen.get(n, seq[n]) for n in tops], width=widths,
             color=["#d2691e" if n in chosen else "#5b95bf" for n in tops])
    gain.axhline(1.0, color="black", linewidth=0.8)
    gain.set_ylabel("speedup")
    gain.set_xlabel("tokens in the step (each bucket's top)")
    gain.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_tensor_parallel(report: dict[str, Any], path: str, title: str) -> bool:
    """The tensor-parallel tune's report (tune.tensor_parallel) drawn as plot_search draws one GPU's:
    each candidate's time against the sequential time it was judged by."""
    cands: dict[str, dict[str, float]] = {}
    kept: dict[str, float] = {}
    for b in report.get("buckets", []):
        tried = b.get("tried") or {}
        seq = next((t["sequential_ms"] for t in tried.values()), b["sequential_ms"])
        cands[str(b["max_tokens"])] = {"sequential": seq, **{k: t["pipelined_ms"] for k, t in tried.items()}}
        if b.get("choice") in tried:
            kept[str(b["max_tokens"])] = tried[b["choice"]]["pipelined_ms"]
    unit = "real steps" if report.get("sequential_step_ms") else "graph replays"
    return plot_search({"measured_candidates_ms": cands, "measured_ms": kept}, path, title,
                       f"ms per bucket ({unit}, decode-only + mixed)")


def _gap(tops: list[int], i: int) -> float:
    """Room for bar i: the distance to its nearer neighbour."""
    near = [abs(tops[j] - tops[i]) for j in (i - 1, i + 1) if 0 <= j < len(tops)]
    return float(min(near)) if near else float(tops[i]) / 2
