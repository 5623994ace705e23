"""`nanoflow tune`: profile the layer ops on this device, search a pipeline, cache it for `--pipeline auto`.

The parser imports nothing heavy (the CLI builds it at every start); `run_tune` imports the engine.
The bench's dummy models and its peak GEMM rate are handed in by the top-level CLI (`dummy_model_dir`,
`peak_tflops`): the bench sits on this package's floor, so this package does not import it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nanoflow.engine_args import add_engine_args

if TYPE_CHECKING:
    import torch

EXAMPLES = """examples:
  nanoflow tune --dummy llama3-8b                      # profile, search, cache for --pipeline auto
  nanoflow tune --dummy llama3-8b --sizes 512,1024,1536,2048 --split-step 128 --ctas 32,44,66 --repeats 5
  nanoflow tune --dummy llama3-8b --profile-only       # the profile JSON alone
  nanoflow tune --dummy llama3-8b --profile-json bench-results/tune-profile_....json  # search again
  nanoflow tune --model /path/to/hf_folder --device cpu --dtype float32 --sizes 8,16,32
"""


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def default_sizes(graphs: Sequence[int], step: int, budget: int) -> list[int]:
    """The profiled sizes, each the top of a pipeline bucket: the graph sizes where buckets end
    (executor.cuda_graph.bucket_ends) from `step` up, then multiples of `step` above the largest graph."""
    from nanoflow.executor.cuda_graph import bucket_ends  # not at import: `nanoflow --help` stays light

    top = max(graphs, default=0)
    ends = {g for g in bucket_ends(graphs, step) if g >= step}
    return sorted(ends | set(range(step, budget + 1, step)) - set(range(0, top + 1)) | {budget})


def _fraction_or_serve(text: str) -> float | str:
    if text == "serve":
        return text
    x = float(text)
    if not 0.0 <= x <= 1.0:
        raise argparse.ArgumentTypeError(f"a fraction from 0 to 1, or serve: {text!r}")
    return x


def add_tune_args(p: argparse.ArgumentParser, dummy_names: Sequence[str] = ()) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EXAMPLES
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="Hugging Face model folder")
    src.add_argument("--dummy", default=None, choices=list(dummy_names) or None,
                     help="a published model's shape with random weights (nothing downloaded)")
    p.add_argument("--load-format", default=None, choices=("auto", "dummy"),
                   help="weights for --model: auto (safetensors) or dummy (random); --dummy forces dummy")

    g = p.add_argument_group("profile")
    g.add_argument("--sizes", type=_ints, default=None,
                   help="step sizes in tokens, comma list; each ends a token bucket of the pipeline (default on a "
                   "GPU: the engine's CUDA graph sizes from --size-step up, so that every graph gets the schedule "
                   "tuned for its own size, and multiples of --size-step above the largest graph; 8,16,32 on "
                   "the CPU)")
    g.add_argument("--size-step", type=int, default=256,
                   help="graph sizes from this one up end token buckets (default 256: smaller steps stayed "
                   "sequential in every H200 tune)")
    g.add_argument("--ctas", type=_ints, default=None,
                   help="SM caps of decode attention to profile and to try ping-pong with, comma list (default a "
                   "third and a half of the SMs, 44,66 on an H200, where 66 won; none on the CPU)")
    g.add_argument("--context-len", type=int, default=None, help="mean decode context (default 1024; CPU 32)")
    g.add_argument("--decode-fraction", type=_fraction_or_serve, default="serve",
                   help="share of a step's tokens that are decodes (the rest prefill chunks), or serve (default): "
                   "the steps a server runs, where a step of the whole token budget holds --budget-decodes "
                   "decodes and a prompt's chunks, and a smaller one only decodes (the profile then times "
                   "decodes-only steps, and the measured check the serving ones)")
    g.add_argument("--budget-decodes", type=int, default=None,
                   help="with --decode-fraction serve: decodes in a step of the whole budget (default a quarter "
                   "of the budget)")
    g.add_argument("--prefill-chunk", type=int, default=None, help="tokens per prefill chunk (default 512; CPU 8)")
    g.add_argument("--shuffle-pages", action="store_true",
                   help="the profiled steps' KV pages in a random order, as a pool that has served a while hands "
                   "them out (default: numbered one after the other)")
    g.add_argument("--layers", type=int, default=4, help="layers each timed sample runs an op over")
    g.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 3; CPU 1)")
    g.add_argument("--repeats", type=int, default=None, help="timed calls, median taken (default 10; CPU 3)")
    g.add_argument("--no-pairs", action="store_true", help="skip the interference table (GPU)")
    g.add_argument("--pair-tokens", type=int, default=None,
                   help="step size of the interference table (default: the profiled size nearest half the largest)")
    g.add_argument("--pair-ops", type=lambda s: [x for x in s.split(",") if x], default=None,
                   help="ops measured beside decode attention, comma list (default: every other op)")

    s = p.add_argument_group("search")
    s.add_argument("--min-gain", type=float, default=0.01,
                   help="a pipeline must beat the sequential schedule's predicted step time by this fraction")
    s.add_argument("--split-step", type=int, default=None,
                   help="split points tried are multiples of this (default: the gcd of the sizes)")
    s.add_argument("--time-limit", type=float, default=60.0, help="seconds the MILP solver may take per bucket")
    s.add_argument("--pingpong-splits", type=lambda t: [float(x) for x in t.split(",") if x],
                   default=[0.25, 0.375, 0.5],
                   help="GPU: the measured check times ping-pong split at these fractions of each bucket's top, "
                   "at each profiled SM cap and uncapped (default 0.25,0.375,0.5: on an H200 each won some "
                   "buckets, 0.625 none)")
    s.add_argument("--gemm-carveout", action="store_true",
                   help="GPU: also time each capped ping-pong with its GEMMs as cuBLAS sized for the SMs the "
                   "decode cap leaves (torch's SM carveout), so the two streams' kernels fit the GPU side by side")
    s.add_argument("--execution-units", action="store_true",
                   help="GPU: also time each capped ping-pong with its two streams on CUDA green contexts, SM "
                   "partitions the GPU enforces (NanoFlow's execution units): nano-batch 1's stream on the "
                   "decode cap's SMs, nano-batch 0's on the rest")
    s.add_argument("--split-fractions", type=lambda t: [float(x) for x in t.split(",") if x], default=[0.5],
                   help="tensor parallel: network-overlap candidates split each bucket at these fractions, each "
                   "measured in one engine start (default 0.5)")
    s.add_argument("--tp-schedules", type=lambda t: [x for x in t.split(",") if x], default=["network", "pingpong"],
                   help="tensor parallel: the candidates' kinds, comma list of network (each all-reduce beside the "
                   "other nano-batch's ops) and pingpong (each nano-batch on a stream of its own, decode attention "
                   "capped at each --ctas, default half the SMs; the all-reduces on a third); each split at each "
                   "--split-fractions, each one engine start")
    s.add_argument("--tp-gemm-ctas", type=lambda t: [int(x) for x in t.split(",") if x], default=[],
                   help="tensor parallel: also try each candidate with every GEMM as cuBLAS sized for this many SMs "
                   "(the SM carveout; e.g. the SMs the decode attention or the all-reduce leaves), comma list")
    s.add_argument("--tp-units", type=_unit_specs, default=[],
                   help="tensor parallel: also try each candidate with its streams on execution units (CUDA green "
                   "contexts), comma list of per-stream SM counts joined by '/': 56/56/16 for ping-pong "
                   "(nano-batch 0 / nano-batch 1 / network), 120/8 for network overlap (compute / network); a "
                   "spec applies to the candidates with as many streams (Hopper takes multiples of 8)")
    s.add_argument("--network-min-tokens", type=int, default=256,
                   help="tensor parallel: buckets above this many tokens get network-overlap candidates")
    s.add_argument("--nccl-ctas", type=lambda t: [int(x) for x in t.split(",") if x], default=[],
                   help="tensor parallel: NCCL CTA caps to try besides the engine's own (--nccl-max-ctas, else "
                   "NCCL's), comma list; each costs a fresh start of every run, and the one kept goes into the "
                   "pipeline, which the engine starts its communicator with")

    o = p.add_argument_group("output")
    o.add_argument("--profile-only", action="store_true", help="write the profile JSON and stop")
    o.add_argument("--profile-json", default=None, help="search from this saved profile instead of profiling")
    o.add_argument("--output", default=None,
                   help="write the pipeline JSON here (default: the cache path --pipeline auto reads)")
    o.add_argument("--output-dir", default="bench-results", help="where the profile and search JSONs go")
    o.add_argument("--no-verify", action="store_true",
                   help="skip timing the chosen schedules' forwards after the search")
    o.add_argument("--no-tqdm", action="store_true", help="no progress bar")

    # the engine's flags; --pipeline is ignored (profiling runs the sequential schedule)
    add_engine_args(p.add_argument_group("engine"), positional_model=False)


def run_tune(args: argparse.Namespace, dummy_model_dir: Callable[[str], str] | None = None,
             peak_tflops: Callable[[torch.device], float] | None = None) -> int:
    """peak_tflops: measures the GEMM rate of a GPU, recorded in the profile (None: not recorded)."""

    from nanoflow.config import EngineConfig
    from nanoflow.engine_args import EngineArgs, engine_kwargs
    from nanoflow.executor.cuda_graph import capture_sizes
    from nanoflow.executor.model_runner import ModelRunner, pipeline_key
    from nanoflow.pipeline.cache import cache_path
    from nanoflow.tune.measured import measure_buckets
    from nanoflow.tune.profile import Workload, profile_ops
    from nanoflow.tune.search import search

    profile = _read_profile(args.profile_json) if args.profile_json else None
    model_dir, load_format, name = _resolve_model(args, dummy_model_dir)
    runner, config = None, None
    if model_dir is not None:
        # the engine's configuration, graphs as the user's flags make them (what the pipeline's buckets
        # follow, and what the tensor-parallel search measures); the profiling runner captures none
        ea = EngineArgs(model=model_dir, load_format=load_format,
                        **{**engine_kwargs(args), "pipeline": "off", "skip_tokenizer_init": True})
        config = EngineConfig.from_args(ea)
        if config.tensor_parallel_size != 1:
            if profile is not None or args.profile_only:
                raise ValueError("under tensor parallelism nanoflow tune measures whole iterations: no op "
                                 "profile (--profile-json, --profile-only) to read or write")
            return _tune_tensor_parallel(args, config, name)
        if profile is not None:
            _check_key(profile["key"], pipeline_key(config, 1), args.profile_json)
    elif profile is None:
        raise ValueError("give --model PATH or --dummy NAME (or --profile-json FILE to search a saved profile)")
    out_dir = Path(args.output_dir)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    workload, profile_path = None, args.profile_json
    if profile is None:
        assert config is not None
        on_gpu = config.device.type == "cuda"
        budget = config.max_num_batched_tokens
        graphs = capture_sizes(config.cuda_graph_max_tokens, config.cuda_graph_sizes)
        sizes = args.sizes or (default_sizes(graphs, args.size_step, budget) if on_gpu else [8, 16, 32])
        sizes = sorted({n for n in sizes if 0 < n <= budget})
        if not sizes:
            raise ValueError(f"no nano-batch size within the token budget ({budget})")
        ctas = args.ctas if args.ctas is not None else default_decode_caps(config.device, tensor_parallel=False)
        serve = args.decode_fraction == "serve"
        workload = Workload(args.context_len or (1024 if on_gpu else 32), 1.0 if serve else args.decode_fraction,
                            args.prefill_chunk or (512 if on_gpu else 8), args.shuffle_pages,
                            budget_decodes=(args.budget_decodes or budget // 4) if serve else None, budget=budget)
        print(f"tune: building {name} on {config.device} ({str(config.dtype).removeprefix('torch.')}, "
              f"token budget {budget})", flush=True)
        runner = ModelRunner(dataclasses.replace(config, cuda_graph_max_tokens=0, cuda_graph_sizes=None))
        peak = peak_tflops(config.device) if on_gpu and peak_tflops is not None else None
        profile = profile_ops(runner, sizes, ctas, workload=workload.profiled(), layers=args.layers, peak_tflops=peak,
                              warmup=args.warmup if args.warmup is not None else (3 if on_gpu else 1),
                              repeats=args.repeats or (10 if on_gpu else 3), pairs=not args.no_pairs,
                              pair_tokens=args.pair_tokens, pair_ops=args.pair_ops, use_tqdm=not args.no_tqdm)
        profile_path = str(_write_json(out_dir / f"tune-profile_{_safe(profile['device'])}_{_safe(name)}_{stamp}.json",
                                       profile))
        print(f"profile: {profile_path} ({profile['elapsed_s']:.0f} s)")
    if args.profile_only:
        _print_profile(profile)
        return 0
    tuning = search(profile, min_gain=args.min_gain, time_limit_s=args.time_limit, split_step=args.split_step)
    times: dict[int, dict[str, float]] = {}
    errors: dict[int, dict[str, float]] = {}
    if runner is not None and not args.no_verify:
        m = measure_buckets(runner, profile, tuning, workload, args.min_gain, args.pingpong_splits,
                            args.gemm_carveout, args.execution_units)
        tuning, times, errors = m.tuning, m.times, m.errors
    target = Path(args.output) if args.output else cache_path(profile["key"])
    tuning.pipeline.save(target)
    measured = {b.max_tokens: times[b.max_tokens][b.candidate.describe()] for b in tuning.buckets
                if b.candidate.split is not None and b.max_tokens in times}
    report = {**tuning.to_json(), "profile": profile_path, "pipeline_path": str(target),
              "measured_ms": {str(k): v for k, v in measured.items()},
              "measured_candidates_ms": {str(k): v for k, v in times.items()},
              # the output check's relative error (against the same schedule on one stream) per candidate checked
              "measured_errors": {str(k): v for k, v in errors.items()},
              "measured_workload": None if workload is None else dataclasses.asdict(workload)}
    search_json = _write_json(out_dir / f"tune-search_{_safe(profile['device'])}_{_safe(name)}_{stamp}.json", report)
    _print_table(profile, tuning, measured, times)
    _plot(report, search_json.with_suffix(".png"), f"nanoflow tune: {profile['device']}, {name}")
    for note in tuning.notes:
        print(f"note: {note}")
    print(f"\npipeline: {target} (search: {tuning.solver}, {tuning.seconds:.1f} s)")
    if args.output:
        print(f"the engine takes it with --pipeline {target}")
    else:
        print("the engine takes it at start with --pipeline auto (the default) whenever the GPU, model shape, "
              "dtype, KV dtype, TP size and token budget match; --pipeline off runs the sequential schedule")
    return 0


def _tune_tensor_parallel(args: argparse.Namespace, config: Any, name: str) -> int:
    """Network overlap for the TP size at hand, chosen by measuring each candidate in an engine start
    (tune/tensor_parallel.py): graph replays, and on a GPU real steps with --context-len decodes."""

    from nanoflow.executor.model_runner import pipeline_key
    from nanoflow.pipeline.cache import cache_path, describe_key
    from nanoflow.tune.tensor_parallel import NETWORK, PINGPONG, TPCandidate, print_table, tune_tensor_parallel

    # the engine's own graphs are what is measured
    if not config.cuda_graph_max_tokens:
        raise ValueError("under tensor parallelism nanoflow tune measures CUDA graph replays: it needs the GPU "
                         "fast path with graphs (not --enforce-eager, --cuda-graph-max-tokens 0 or a CPU)")
    key = pipeline_key(config, config.tensor_parallel_size)
    print(f"tune: {name} ({describe_key(key)})", flush=True)
    unknown = set(args.tp_schedules) - {NETWORK, PINGPONG}
    if unknown:
        raise ValueError(f"--tp-schedules: unknown kinds {sorted(unknown)} (network, pingpong)")
    on_gpu = config.device.type == "cuda"
    caps = args.ctas or default_decode_caps(config.device, tensor_parallel=True)
    candidates = [TPCandidate(kind, f, cap, gemm, units) for f in args.split_fractions for kind in args.tp_schedules
                  for cap in (caps if kind == PINGPONG else [None]) for gemm in [None, *args.tp_gemm_ctas]
                  for units in [(), *(u for u in args.tp_units if len(u) == TPCandidate(kind).num_streams)]]
    t = tune_tensor_parallel(config, key, candidates, args.network_min_tokens, args.min_gain, args.nccl_ctas,
                             context_len=(args.context_len or 1024) if on_gpu else 0, size_step=args.size_step)
    target = Path(args.output) if args.output else cache_path(key)
    t.pipeline.save(target)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    data = {**t.to_json(), "pipeline_path": str(target)}
    report = _write_json(Path(args.output_dir) / f"tune-tp{key['tp']}_{_safe(key['gpu'])}_{_safe(name)}_{stamp}.json",
                         data)
    print_table(t)
    _plot(data, report.with_suffix(".png"), f"nanoflow tune: {key['gpu']}, {name}, tensor parallel {key['tp']}",
          tensor_parallel=True)
    print(f"\npipeline: {target} ({len(t.pipeline.schedules)} pipelined buckets; report {report})")
    return 0


def _unit_specs(text: str) -> list[tuple[int, ...]]:
    """--tp-units: "56/56/16,120/8" -> [(56, 56, 16), (120, 8)]."""
    return [tuple(int(n) for n in spec.split("/")) for spec in text.split(",") if spec]


def default_decode_caps(device: Any, tensor_parallel: bool) -> list[int | None]:
    """The decode attention SM caps tried when --ctas names none: a third and half of the SMs on one
    GPU (where profiling one more costs seconds; on an H200 half won), half alone under tensor
    parallelism (where each one more is an engine start per candidate); on the CPU none (one, uncapped,
    under TP)."""
    from nanoflow.kernels.attention_common import num_sms

    sms = num_sms(device.index or 0) if device.type == "cuda" else 0
    if tensor_parallel:
        return [sms // 2 or None]
    return sorted({c for c in (sms // 3, sms // 2) if c})


def _resolve_model(args: argparse.Namespace,
                   dummy_model_dir: Callable[[str], str] | None) -> tuple[str | None, str, str]:
    if args.dummy:
        if dummy_model_dir is None:
            raise ValueError("--dummy needs the bench's dummy models (run it as `nanoflow tune`)")
        return dummy_model_dir(args.dummy), "dummy", args.dummy
    if args.model:
        return args.model, args.load_format or "auto", Path(args.model).name
    return None, "auto", "profile"


def _read_profile(path: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read profile {path!r}: {e}") from e
    if data.get("kind") != "nanoflow-tune-profile" or data.get("version") != 1:
        raise ValueError(f"{path!r} is no nanoflow tune profile (version 1)")
    return data


def _check_key(got: dict[str, Any], want: dict[str, Any], path: str) -> None:
    diff = {k: (got.get(k), want.get(k)) for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k)}
    if diff:
        raise ValueError(f"profile {path!r} was measured for another setup than the engine flags give: " +
                         ", ".join(f"{k}: profile {a!r} vs engine {b!r}" for k, (a, b) in diff.items()))


def _print_profile(profile: dict[str, Any]) -> None:
    names = list(profile["op_ms"])
    print("ms per layer by nano-batch size (tokens):")
    print(f"{'op':<22}" + "".join(f"{n:>9}" for n in profile["sizes"]))
    for op in names:
        print(f"{op:<22}" + "".join(f"{x:>9.4f}" for x in profile["op_ms"][op]))
    for c, xs in profile.get("decode_attention_capped_ms", {}).items():
        print(f"{'decode @' + c + ' CTAs':<22}" + "".join(f"{x:>9.4f}" for x in xs))
    pairs = profile.get("interference", {}).get("pairs", {})
    if pairs:
        print("kept fractions beside capped decode attention (op / attention):")
        for op, by_cap in pairs.items():
            cells = (f"  {c}: {v['op_kept']:.2f}/{v['attention_kept']:.2f}" for c, v in by_cap.items())
            print(f"{op:<22}" + "".join(cells))
    else:
        print(f"interference: {profile.get('interference', {}).get('note', 'not measured')}")
    prefill = profile.get("interference", {}).get("prefill_pairs", {})
    if prefill:  # recorded only: the search does not use it
        print("kept fractions beside prefill attention, uncapped (op / attention):")
        for op, v in prefill.items():
            print(f"{op:<22}  {v['op_kept']:.2f}/{v['attention_kept']:.2f}")


def _print_table(profile: dict[str, Any], tuning: Any, measured: dict[int, float],
                 times: dict[int, dict[str, float]]) -> None:
    # the measured check's sequential forward where it ran one (a serving step), else the profile's
    forward = dict(zip(profile["sizes"], profile.get("forward_ms") or [], strict=False))
    forward.update({n: ms["sequential"] for n, ms in times.items() if "sequential" in ms})
    print("\npredicted step time (layers only) per token bucket; measured: one whole forward at the bucket's top")
    print(f"{'tokens':>12} {'sequential ms':>14} {'chosen ms':>10} {'gain':>6} {'measured seq':>13} "
          f"{'measured chosen':>16}  choice")
    for b in tuning.buckets:
        seq = forward.get(b.max_tokens)
        got = measured.get(b.max_tokens)
        chosen = f"{b.predicted_ms:>10.3f} {b.sequential_ms / b.predicted_ms:>5.2f}x" if b.predicted_ms else \
            f"{'-':>10} {'-':>6}"
        print(f"{f'{b.min_tokens}-{b.max_tokens}':>12} {b.sequential_ms:>14.3f} {chosen} "
              f"{'' if seq is None else f'{seq:.3f}':>13} {'' if got is None else f'{got:.3f}':>16}  "
              f"{b.candidate.describe()}{' (measured)' if b.measured else ''}")


def _plot(report: dict[str, Any], path: Path, title: str, tensor_parallel: bool = False) -> None:
    """The chart beside the search JSON; a tune that cannot draw it still stands."""
    from nanoflow.tune.plot import plot_search, plot_tensor_parallel

    try:
        if (plot_tensor_parallel if tensor_parallel else plot_search)(report, str(path), title):
            print(f"chart: {path}")
    except Exception as e:  # e.g. no matplotlib
        print(f"chart not drawn: {type(e).__name__}: {e}")


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in s)


def _write_json(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    stem, n = path.stem, 1
    while path.exists():  # two runs in one second keep both files
        n += 1
        path = path.with_name(f"{stem}-{n}{path.suffix}")
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path
