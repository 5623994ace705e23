"""From a profile to a pipeline: per token bucket, the number of nano-batches (1: sequential, or 2),
the split point and decode attention's SM cap, chosen by a MILP that minimises the predicted step
time (HiGHS through scipy.optimize.milp).

The MILP of one bucket (sizes up to T tokens; model.py defines the phases and their terms):
  binaries x_k, one per candidate k (sequential, or split s x SM cap c), sum_k x_k = 1;
  for each phase j of k where decode attention (W1 ms alone at cap c) runs beside stream-0 work
  (W0 ms alone), keeping fractions r0, r1 of their speeds: a continuous tau_kj, the time both
  streams run together, pinned to min(W0/r0, W1/r1) * x_k:
      tau_kj <= (W0/r0) x_k,  tau_kj <= (W1/r1) x_k,
      tau_kj >= (W0/r0) x_k - M u_kj,  tau_kj >= (W1/r1) x_k - M (1 - u_kj)   (u_kj binary: which
      stream drains first; only needed where overlap hurts, r0 + r1 < 1, else the objective pins it)
  minimise  L * sum_k [serial_k x_k - sum_j (r0 + r1 - 1)_kj tau_kj]
where serial_k is every op instance's time alone (decode attention at its cap) and L the number of
layers. The sequential candidate's serial time is discounted by `min_gain`, so a pipeline must win
by that margin: where overlap does not pay, the sequential schedule is the answer.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import reduce
from typing import Any

from nanoflow.pipeline.schedule import OVERLAP_ORDERS, Pipeline
from nanoflow.tune.model import Candidate, CostModel, Evaluation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BucketChoice:
    min_tokens: int
    max_tokens: int
    candidate: Candidate
    # a step at max_tokens, layers only (embedding, final norm, LM head excluded); None: a candidate
    # the model cannot price, chosen by measurement (tune.measured)
    predicted_ms: float | None
    sequential_ms: float
    num_candidates: int
    measured: bool = False  # the choice is measurement's, overturning the model's
    # the model's cheapest candidate of each overlap order other than the pick (tune.measured times them)
    runners_up: tuple[Candidate, ...] = ()

    def to_json(self) -> dict[str, Any]:
        c = self.candidate
        return {"min_tokens": self.min_tokens, "max_tokens": self.max_tokens, "choice": c.describe(),
                "split": c.split, "decode_ctas": c.ctas, "beside": c.beside if c.split else None,
                "predicted_ms": self.predicted_ms, "sequential_ms": self.sequential_ms,
                "gain": self.sequential_ms / self.predicted_ms if self.predicted_ms else None,
                "candidates": self.num_candidates, "chosen_by_measurement": self.measured}


@dataclass
class Tuning:
    pipeline: Pipeline
    buckets: list[BucketChoice]
    solver: str
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"solver": self.solver, "notes": self.notes, "seconds": self.seconds,
                "buckets": [b.to_json() for b in self.buckets], "pipeline": self.pipeline.to_json()}


def buckets(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """Token ranges ending at each profiled size: (1, s0), (s0 + 1, s1), ..."""
    s = sorted(set(sizes))
    return [(1 if i == 0 else s[i - 1] + 1, hi) for i, hi in enumerate(s)]


def candidates(lo: int, step: int, ctas: Sequence[int | None]) -> list[Candidate]:
    """The sequential schedule, then every split (a multiple of step, below lo so that no nano-batch
    of the bucket is ever empty) x cap x what decode attention runs beside."""
    return [Candidate(), *(Candidate(split, c, beside) for split in range(step, lo, step) for c in ctas
                           for beside in OVERLAP_ORDERS)]


def search(profile: dict[str, Any], *, split_step: int | None = None, min_gain: float = 0.01,
           time_limit_s: float = 60.0, solver: str = "milp") -> Tuning:
    """The pipeline that the profile predicts fastest per bucket of its sizes. solver: "milp"
    (HiGHS) or "enumerate" (the same model, every candidate priced; also used without scipy)."""
    t0 = time.perf_counter()
    model = CostModel(profile)
    sizes = sorted(profile["sizes"])
    step = split_step or reduce(math.gcd, sizes)
    caps: list[int | None] = list(model.ctas)
    notes = []
    if not caps:
        caps = [None]  # no capped profile (the CPU): decode attention keeps the whole device
        notes.append("no SM caps profiled: decode attention is priced on the whole device beside the GEMMs")
    if not profile.get("interference", {}).get("pairs"):
        notes.append("no interference table in the profile: side-by-side work is priced as if run one after "
                     "the other (a GPU profile measures it)")
    if solver == "milp":
        try:
            import scipy.optimize  # noqa: F401
        except ImportError:
            log.warning("tune: scipy is not installed; pricing every candidate instead of solving the MILP")
            solver = "enumerate"
    label = "HiGHS MILP (scipy.optimize.milp)" if solver == "milp" else "every candidate priced"
    choices = []
    for lo, hi in buckets(sizes):
        cands = candidates(lo, step, caps)
        evals = [model.evaluate(c, hi) for c in cands]
        costs = [e.layer_ms * model.num_layers for e in evals]
        k = _solve_milp(cands, evals, model.num_layers, min_gain, time_limit_s) if solver == "milp" else \
            min(range(len(cands)), key=lambda i: _biased(cands[i], costs[i], min_gain))
        # the cheapest candidate of each overlap order besides the pick: what tune.measured times too
        best_of = {o: min((i for i, c in enumerate(cands) if c.beside == o and c.split is not None),
                          key=lambda i: costs[i], default=None) for o in OVERLAP_ORDERS}
        runners_up = tuple(cands[i] for i in best_of.values() if i is not None and i != k)
        choices.append(BucketChoice(lo, hi, cands[k], costs[k], costs[0], len(cands), runners_up=runners_up))
    names = model.names
    schedules = tuple(
        dataclasses.replace(b.candidate.schedule(names, b.min_tokens, b.max_tokens), predicted_ms=b.predicted_ms)
        for b in choices)
    pipeline = Pipeline(schedules, dict(profile["key"]), "nanoflow tune")
    pipeline.check(names)
    if model.assumed and model.pairs:
        notes.append("interference not measured for " + ", ".join(sorted(model.assumed)) +
                     " (op@cap): the mean of measured ops of its resource, or serial where none")
    return Tuning(pipeline, choices, label, notes, time.perf_counter() - t0)


def _biased(cand: Candidate, cost: float, min_gain: float) -> float:
    return cost * (1 - min_gain) if cand.split is None else cost


def _solve_milp(cands: list[Candidate], evals: list[Evaluation], num_layers: int, min_gain: float,
                time_limit_s: float) -> int:
    """Index of the candidate the MILP of the module docstring picks."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    L = float(num_layers)
    cost = [_biased(c, e.serial_ms * L, min_gain) for c, e in zip(cands, evals, strict=True)]
    integrality = [1] * len(cands)
    upper = [1.0] * len(cands)
    rows: list[tuple[dict[int, float], float, float]] = [({k: 1.0 for k in range(len(cands))}, 1.0, 1.0)]

    def var(c: float, is_int: bool, ub: float) -> int:
        cost.append(c)
        integrality.append(int(is_int))
        upper.append(ub)
        return len(cost) - 1

    for k, e in enumerate(evals):
        for o in e.overlaps:
            a, b, gain = o.w0 / o.r0, o.w1 / o.r1, o.r0 + o.r1 - 1
            tau = var(-L * gain, False, np.inf)
            rows += [({tau: 1.0, k: -a}, -np.inf, 0.0), ({tau: 1.0, k: -b}, -np.inf, 0.0)]
            if gain < 0:  # the objective would push tau to 0: pin it to the min from below too
                m = max(a, b)
                u = var(0.0, True, 1.0)
                rows += [({tau: 1.0, k: -a, u: m}, 0.0, np.inf), ({tau: 1.0, k: -b, u: -m}, -m, np.inf)]
    r, c, v = [], [], []
    for i, (coefs, _, _) in enumerate(rows):
        for j, x in coefs.items():
            r.append(i)
            c.append(j)
            v.append(x)
    a_mat = coo_matrix((v, (r, c)), shape=(len(rows), len(cost))).tocsr()
    res = milp(np.asarray(cost), integrality=np.asarray(integrality),
               bounds=Bounds(np.zeros(len(cost)), np.asarray(upper)),
               constraints=LinearConstraint(a_mat, [x[1] for x in rows], [x[2] for x in rows]),
               options={"time_limit": time_limit_s, "disp": False})
    if res.x is None:
        raise RuntimeError(f"the pipeline MILP found no solution: {res.message}")
    k = int(np.argmax(res.x[: len(cands)]))
    closed = _biased(cands[k], evals[k].layer_ms * L, min_gain)
    if not math.isclose(res.fun, closed, rel_tol=1e-4, abs_tol=1e-6):
        log.warning("tune: the MILP's objective %.6f differs from the closed form %.6f", res.fun, closed)
    return k
