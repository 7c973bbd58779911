"""Why does FLoRA-NA lose accuracy to FedIT on SST-2 at the headline budget?

    OMP_NUM_THREADS=1 python benchmarks/flora_na_diagnosis.py --data-dir ../shared/data/glue --seeds 0 1 2
    OMP_NUM_THREADS=1 python benchmarks/flora_na_diagnosis.py --seeds 0 --score fedit flora-na svd "flora-na ridge=1" \
        --out results/flora_na_diagnosis_seed0_scored        # also score svd's and ridge's adapters on the dev rows
    python benchmarks/flora_na_diagnosis.py --tables-only --out results/flora_na_diagnosis   # re-print from records.json

Runs the ``headline`` preset's SST-2 setting (10 clients, Dirichlet 0.5, 8 rounds × 4 local steps at batch 8 × 48
tokens, lr 5e-3, r 8, lora_alpha 16, 200 dev rows) through the local engine, for fedit and flora-na, one run at a
time on one thread (~160–230 s per run on a shared 2-core CPU). Nothing in the library is edited: for the length
of a run the script swaps in

* a wrapper of ``fedlora.protocol.rounds.server_step`` (the name the round protocol calls) that, after the real aggregation,
  measures the round on the very same client updates: the applied result, and what FedIT, FLoRA-NA, the truncated
  SVD, post-hoc damped or clipped FLoRA-NA coefficients and (if the library has the options) a ridge-regularised or
  deviation-bounded FLoRA-NA would have broadcast. Per candidate: factor norms, the product step ‖B̂Â − B_gA_g‖
  against FedIT's and the target's ‖T − B_gA_g‖, its cosine with the target step, its gain along it, and the
  divergence ‖B̂Â − T‖/‖T‖; for the FLoRA-NA candidates also p, q and the objective against FedIT's;
* a wrapper of ``fedlora.protocol.rounds.evaluate_on`` plus ``fedlora.models.training.evaluate`` that keeps the global model's dev
  predictions (accuracy, and the share of rows given the most-predicted class: 1.0 = stuck at one class) and, before
  that, scores the ``--score`` candidates' adapters with the same round's averaged head: the one-round effect of the
  aggregation alone (the run's own adapter is put back before its evaluation, so the run is unchanged).

Writes ``<out>/records.json`` (every number, with the commit and hashes of the FLoRA-NA sources) and
``<out>/tables.md`` (what it prints), and the runs under ``<out>/runs/<method>/seed<k>``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
from torch import Tensor

import fedlora.protocol.rounds
import fedlora.models.training
from fedlora.aggregation import Adapter, AggregationResult, ClientUpdate, aggregate, client_weights, get_method
from fedlora.bench.presets import HEADLINE_BASE
from fedlora.protocol.client import ClientResult
from fedlora.config.run import RunConfig
from fedlora.models.lora_state import set_adapter
from fedlora.engines.local import run as simulate

METHODS = ("fedit", "flora-na")  # the two real runs per seed
HAS_RIDGE = "ridge" in get_method("flora-na").options  # another change may add it; skip the column if absent
HAS_MAX_DEV = "max_deviation" in get_method("flora-na").options  # likewise: the library's own bound on |x − 1|
RIDGE = 1.0
DAMP = 0.5  # post-hoc "half step": x = 1 + DAMP (x* − 1)
CLIP = 0.5  # post-hoc bound: x = clamp(x*, 1 − CLIP, 1 + CLIP)
COLLAPSE = 0.9  # a round whose most-predicted class takes >= 90% of the dev rows counts as collapsed
# Candidates measured on every round's client updates; "applied" is what the run itself broadcast.
CANDIDATES = ("fedit", "flora-na", f"flora-na ×{DAMP} step", f"flora-na clip ±{CLIP}") + (
    (f"flora-na max_deviation={CLIP:g}",) if HAS_MAX_DEV else ()) + ((f"flora-na ridge={RIDGE:g}",) if HAS_RIDGE else ()) + ("svd",)

Products = dict[str, Tensor]  # {module: (d, k)} float64


# -- linear algebra on whole adapters (float64, dense: MiniLM's 12 modules are 384 × 384) -------------------------------
def as64(adapter: Adapter) -> dict[str, tuple[Tensor, Tensor]]:
    return {m: (p.A.detach().double(), p.B.detach().double()) for m, p in adapter.items()}


def products(factors: dict[str, tuple[Tensor, Tensor]]) -> Products:
    return {m: B @ A for m, (A, B) in factors.items()}


def norm(tensors: dict[str, Tensor]) -> float:
    return math.sqrt(sum(float((t * t).sum()) for t in tensors.values()))


def inner(x: dict[str, Tensor], y: dict[str, Tensor]) -> float:
    return sum(float((x[m] * y[m]).sum()) for m in x)


def minus(x: dict[str, Tensor], y: dict[str, Tensor]) -> dict[str, Tensor]:
    return {m: x[m] - y[m] for m in x}


def target(updates: Sequence[ClientUpdate], w: Tensor) -> Products:
    """T = Σ_u w_u B_u A_u per module."""
    clients = [as64(u.adapter) for u in updates]
    return {m: sum(float(w[i]) * (c[m][1] @ c[m][0]) for i, c in enumerate(clients)) for m in clients[0]}  # type: ignore[misc]


def broadcast(glob: dict[str, tuple[Tensor, Tensor]], updates: Sequence[ClientUpdate], w: Tensor,
              p: dict[str, Tensor], q: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """FLoRA-NA's broadcast for given coefficients: Â = A_g + Σ w_u p_u ΔA_u, B̂ = B_g + Σ w_u q_u ΔB_u."""
    clients = [as64(u.adapter) for u in updates]
    out = {}
    for m, (A_g, B_g) in glob.items():
        A = A_g + sum(float(w[i] * p[m][i]) * (c[m][0] - A_g) for i, c in enumerate(clients))
        B = B_g + sum(float(w[i] * q[m][i]) * (c[m][1] - B_g) for i, c in enumerate(clients))
        out[m] = (A, B)
    return out


def step_stats(cand: dict[str, tuple[Tensor, Tensor]], glob: dict[str, tuple[Tensor, Tensor]],
               fedit: dict[str, tuple[Tensor, Tensor]], T: Products) -> dict[str, float]:
    """How a candidate broadcast moves the global product, against FedIT's and the target's move."""
    P_g, P = products(glob), products(cand)
    step, step_T, step_fedit = minus(P, P_g), minus(T, P_g), minus(products(fedit), P_g)
    nA = norm({m: a for m, (a, _) in cand.items()})
    nB = norm({m: b for m, (_, b) in cand.items()})
    return {
        "norm_A": nA, "norm_B": nB,
        "norm_A_vs_fedit": nA / norm({m: a for m, (a, _) in fedit.items()}),
        "norm_B_vs_fedit": nB / norm({m: b for m, (_, b) in fedit.items()}),
        # factor moves: ‖Â − A_g‖ / ‖Ā − A_g‖ (FedIT's move of each factor)
        "dA_vs_fedit": norm({m: cand[m][0] - glob[m][0] for m in cand}) / norm({m: fedit[m][0] - glob[m][0] for m in cand}),
        "dB_vs_fedit": norm({m: cand[m][1] - glob[m][1] for m in cand}) / norm({m: fedit[m][1] - glob[m][1] for m in cand}),
        "step": norm(step),
        "step_vs_fedit": norm(step) / norm(step_fedit),
        "step_vs_target": norm(step) / norm(step_T),
        "cos_target": inner(step, step_T) / (norm(step) * norm(step_T)),
        "gain": inner(step, step_T) / norm(step_T) ** 2,  # component along the target step: 1 = exactly its length
        "divergence": norm(minus(P, T)) / norm(T),
    }


def coefficient_stats(x: dict[str, Tensor], w: Tensor, client_ids: list[str]) -> dict[str, Any]:
    """min, max, mean, weighted step scale Σ_u w_u x_u, max |x − 1| and whose it is, over modules × clients."""
    X = torch.stack([x[m].double().cpu() for m in x])  # (M, U)
    dev = (X - 1).abs()
    flat = int(dev.argmax())
    client = flat % X.shape[1]
    return {"min": float(X.min()), "max": float(X.max()), "mean": float(X.mean()),
            "wmean": float((X * w.cpu()).sum(1).mean()), "max_dev": float(dev.max()),
            "median_dev": float(dev.median()), "client": client_ids[client], "client_w": float(w[client])}


# -- the recorder: what the wrappers write, one record per round -----------------------------------------------------------
class Recorder:
    def __init__(self, method: str, seed: int, score: Sequence[str]) -> None:
        self.method, self.seed, self.score = method, seed, tuple(score)
        self.rounds: list[dict[str, Any]] = []
        self.eval_as: str | None = None  # set while the round's global dev evaluation runs: "applied" or a candidate
        self.applied: Adapter = {}
        self.pending: dict[str, Adapter] = {}  # counterfactual adapters to score on the dev rows this round
        self.seconds = {"measure": 0.0, "counterfactual_eval": 0.0}  # what the diagnosis itself adds to the run

    def measure(self, glob_adapter: Adapter, results: Sequence[ClientResult], applied: AggregationResult) -> None:
        updates = [r.update for r in results]
        ids = [u.client_id for u in updates]
        w = client_weights(updates, "examples").double()
        glob, T = as64(glob_adapter), target(updates, w)
        fedit = as64(aggregate("fedit", glob_adapter, updates).adapter)
        runs: dict[str, AggregationResult] = {"fedit": applied} if self.method == "fedit" else {}
        runs["flora-na"] = applied if self.method == "flora-na" else aggregate("flora-na", glob_adapter, updates)
        if HAS_RIDGE:
            runs[f"flora-na ridge={RIDGE:g}"] = aggregate("flora-na", glob_adapter, updates, ridge=RIDGE)
        if HAS_MAX_DEV:
            runs[f"flora-na max_deviation={CLIP:g}"] = aggregate("flora-na", glob_adapter, updates, max_deviation=CLIP)
        runs["svd"] = aggregate("svd", glob_adapter, updates)
        self.applied = applied.adapter
        adapters = {"fedit": aggregate("fedit", glob_adapter, updates).adapter, **{n: r.adapter for n, r in runs.items()}}
        self.pending = {name: adapters[name] for name in self.score if name != self.method}
        p, q = runs["flora-na"].extras["p"], runs["flora-na"].extras["q"]
        damped = {m: 1 + DAMP * (p[m] - 1) for m in p}, {m: 1 + DAMP * (q[m] - 1) for m in q}
        clipped = {m: p[m].clamp(1 - CLIP, 1 + CLIP) for m in p}, {m: q[m].clamp(1 - CLIP, 1 + CLIP) for m in q}
        cands: dict[str, dict[str, tuple[Tensor, Tensor]]] = {
            "fedit": fedit,
            f"flora-na ×{DAMP} step": broadcast(glob, updates, w, *damped),
            f"flora-na clip ±{CLIP}": broadcast(glob, updates, w, *clipped),
            **{name: as64(r.adapter) for name, r in runs.items() if name != "fedit"},
            "applied": as64(applied.adapter),
        }
        coeffs = {name: {"p": coefficient_stats(r.extras["p"], w, ids), "q": coefficient_stats(r.extras["q"], w, ids),
                         "objective_ratio": r.metrics["objective"] / r.metrics["objective_fedit"]}
                  for name, r in runs.items() if name.startswith("flora-na")}
        for name, (pp, qq) in ((f"flora-na ×{DAMP} step", damped), (f"flora-na clip ±{CLIP}", clipped)):
            coeffs[name] = {"p": coefficient_stats(pp, w, ids), "q": coefficient_stats(qq, w, ids)}
        self.rounds.append({
            "round": len(self.rounds) + 1,
            "rejected": len(applied.metrics.get("rejected", [])),
            "modules": len(glob),
            "weights": [float(x) for x in w],
            "global_norm_A": norm({m: a for m, (a, _) in glob.items()}),
            "global_norm_B": norm({m: b for m, (_, b) in glob.items()}),
            "target_step": norm(minus(T, products(glob))),
            "candidates": {name: step_stats(c, glob, fedit, T) for name, c in cands.items()},
            "coefficients": coeffs,
        })

    def predictions(self, logits: np.ndarray, labels: np.ndarray) -> None:
        predicted = logits.argmax(axis=1)
        counts = np.bincount(predicted, minlength=logits.shape[1])
        scores = {"accuracy": float((predicted == labels).mean()), "majority_share": float(counts.max() / len(predicted))}
        if self.eval_as == "applied":
            self.rounds[-1].update(scores, majority_class=int(counts.argmax()), label1_share=float((labels == 1).mean()))
        else:  # the same round's global head with a counterfactual adapter: one-round effect of the aggregation alone
            self.rounds[-1].setdefault("counterfactual_eval", {})[self.eval_as] = scores


@contextlib.contextmanager
def recording(recorder: Recorder) -> Iterator[None]:
    """Swap the wrappers in for one run; the library's own functions do all the work."""
    real_step: Callable[..., Any] = fedlora.protocol.rounds.server_step
    real_eval_on: Callable[..., Any] = fedlora.protocol.rounds.evaluate_on
    real_predict: Callable[..., Any] = fedlora.models.training.evaluate

    def server_step(method: str, global_adapter: Adapter, results: Sequence[ClientResult], **kw: Any) -> Any:
        agg, head = real_step(method, global_adapter, results, **kw)
        start = time.perf_counter()
        recorder.measure(global_adapter, results, agg)
        recorder.seconds["measure"] += time.perf_counter() - start
        return agg, head

    def evaluate_on(model: Any, *args: Any, **kw: Any) -> Any:  # the round protocol's global evaluation only
        try:
            # First the counterfactual adapters (same head, same frozen weights), then the applied one is put back
            # exactly (set_adapter copies values; evaluation draws no random numbers), so the run is unchanged.
            start = time.perf_counter()
            for name, adapter in recorder.pending.items():
                recorder.eval_as = name
                set_adapter(model, adapter)
                real_eval_on(model, *args, **kw)
            set_adapter(model, recorder.applied)
            recorder.seconds["counterfactual_eval"] += time.perf_counter() - start
            recorder.eval_as = "applied"
            return real_eval_on(model, *args, **kw)
        finally:
            recorder.eval_as = None

    def predict(*args: Any, **kw: Any) -> Any:
        logits, labels = real_predict(*args, **kw)
        if recorder.eval_as is not None:
            recorder.predictions(logits, labels)
        return logits, labels

    with mock.patch.object(fedlora.protocol.rounds, "server_step", server_step), \
            mock.patch.object(fedlora.protocol.rounds, "evaluate_on", evaluate_on), \
            mock.patch.object(fedlora.models.training, "evaluate", predict):
        yield


def run_one(method: str, seed: int, rounds: int, data_dir: str, out: Path, score: Sequence[str]) -> dict[str, Any]:
    run_dir = out / "runs" / method / f"seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    config = RunConfig(task="sst2", data_dir=data_dir, method=method, seed=seed, out=str(run_dir),
                       **{**HEADLINE_BASE, "rounds": rounds})
    recorder = Recorder(method, seed, score)
    start = time.perf_counter()
    with recording(recorder):
        history = simulate(config, progress=False)
    for record, h in zip(recorder.rounds, history):  # our capture must agree with the engine's own metric
        assert abs(record["accuracy"] - h["global_metric"]) < 1e-9, (record["accuracy"], h["global_metric"])
        record["divergence_engine"] = h["divergence"]
    seconds = time.perf_counter() - start
    print(f"  {method} seed {seed}: {seconds:.0f} s (diagnosis {recorder.seconds['measure']:.0f} s, counterfactual "
          f"evaluation {recorder.seconds['counterfactual_eval']:.0f} s), accuracy per round "
          + " ".join(f"{r['accuracy']:.3f}" for r in recorder.rounds), file=sys.stderr, flush=True)
    return {"method": method, "seed": seed, "seconds": seconds, "diagnosis_seconds": recorder.seconds, "rounds": recorder.rounds}


def provenance(argv: list[str]) -> dict[str, Any]:
    """The commit, and hashes of the FLoRA-NA sources this process imported (the tree may be dirty)."""
    import hashlib
    import subprocess

    import fedlora.aggregation.methods.flora_na as module

    root = Path(module.__file__).parent
    describe = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                              cwd=root).stdout.strip()
    return {"argv": argv, "git_describe": describe, "torch_threads": torch.get_num_threads(),
            "flora_na_options": list(get_method("flora-na").options),
            "sha256": {f.name: hashlib.sha256(f.read_bytes()).hexdigest()[:16] for f in sorted(root.glob("flora_na*.py"))}}


# -- tables ---------------------------------------------------------------------------------------------------------------
def mean(xs: Sequence[float]) -> float:
    return statistics.fmean(xs)


def pm(xs: Sequence[float], digits: int = 3, sign: str = "+") -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{mean(xs):{sign}.{digits}f} ± {sd:.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:  # a literal | (as in |p − 1|) would end the cell: escape it
        return (f"{v:.3f}" if isinstance(v, float) else str(v)).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def tables(records: list[dict[str, Any]]) -> str:
    runs = {(r["method"], r["seed"]): r["rounds"] for r in records}
    seeds = sorted(s for m, s in runs if m == METHODS[0] and (METHODS[1], s) in runs)  # seeds with both runs done
    R = len(runs[("fedit", seeds[0])])
    na, fe = "flora-na", "fedit"
    cands = [c for c in CANDIDATES if c in runs[(fe, seeds[0])][0]["candidates"]]
    out: list[str] = []

    def rounds_of(method: str, r: int) -> list[dict[str, Any]]:
        return [runs[(method, s)][r] for s in seeds]

    # 1. accuracy per seed, and collapse to one class
    out.append("### 1. Final accuracy per seed (200 SST-2 dev rows), and collapse to one class\n")
    out.append("maj = share of dev rows given the most-predicted class (label-1 share of the dev rows, seed "
               + ", ".join(f"{s}: {runs[(fe, s)][0]['label1_share']:.3f}" for s in seeds)
               + f"); collapsed rounds = rounds with maj ≥ {COLLAPSE}.\n")
    rows, deltas, best_deltas = [], [], []
    for s in seeds:
        f, n = runs[(fe, s)], runs[(na, s)]
        d, db = n[-1]["accuracy"] - f[-1]["accuracy"], max(x["accuracy"] for x in n) - max(x["accuracy"] for x in f)
        deltas.append(d)
        best_deltas.append(db)
        coll = [sum(x["majority_share"] >= COLLAPSE for x in run) for run in (f, n)]
        rows.append([s, f[-1]["accuracy"], n[-1]["accuracy"], f"{d:+.3f}", f"{db:+.3f}",
                     f"{f[-1]['majority_share']:.3f}", f"{n[-1]['majority_share']:.3f}", f"{coll[0]} / {coll[1]}",
                     max(x["coefficients"][na]["p"]["max_dev"] for x in n), max(x["coefficients"][na]["q"]["max_dev"] for x in n)])
    rows.append(["mean ± sd", pm([runs[(fe, s)][-1]["accuracy"] for s in seeds], sign=""),
                 pm([runs[(na, s)][-1]["accuracy"] for s in seeds], sign=""),
                 pm(deltas), pm(best_deltas), "", "", "", "", ""])
    out.append(table(["seed", "fedit final", "flora-na final", "Δ final (na − fedit)", "Δ best", "fedit maj (final)",
                      "flora-na maj (final)", "collapsed rounds fedit / na", "na max |p−1|", "na max |q−1|"], rows))

    out.append("\n### 2. Accuracy (most-predicted share) per round and seed\n")
    rows = [[m, s] + [f"{x['accuracy']:.3f} ({x['majority_share']:.2f})" for x in runs[(m, s)]] for s in seeds for m in METHODS]
    out.append(table(["method", "seed"] + [f"r{r + 1}" for r in range(R)], rows))

    # 3. the flora-na run: its coefficients per round
    out.append("\n### 3. FLoRA-NA run: coefficients p (on A) and q (on B) per round, over the 12 modules × 10 clients\n")
    out.append("Mean over seeds of each statistic; range = min of minima … max of maxima over seeds; Σw·x = the "
               "weighted step scale of the factor (1 = FedIT's); objective ratio = L(p*, q*) / L(1, 1); extreme client "
               "= the client holding the largest |x − 1| (most frequent over seeds) and its mean weight w (1/U = 0.1).\n")
    rows = []
    for r in range(R):
        cs = [x["coefficients"][na] for x in rounds_of(na, r)]
        row: list[Any] = [r + 1]
        for k in ("p", "q"):
            row += [f"{min(c[k]['min'] for c in cs):.2f} … {max(c[k]['max'] for c in cs):.2f}", mean([c[k]["mean"] for c in cs]),
                    mean([c[k]["wmean"] for c in cs]), mean([c[k]["median_dev"] for c in cs]), mean([c[k]["max_dev"] for c in cs])]
        who = Counter(c[k]["client"] for c in cs for k in ("p", "q")).most_common(1)[0][0]
        row += [f"{who} (w {mean([c[k]['client_w'] for c in cs for k in ('p', 'q')]):.3f})",
                mean([c["objective_ratio"] for c in cs])]
        rows.append(row)
    out.append(table(["round", "p range", "p mean", "Σw·p", "median |p−1|", "max |p−1|", "q range", "q mean", "Σw·q",
                      "median |q−1|", "max |q−1|", "extreme client", "objective ratio"], rows))

    # 4. the flora-na run: its steps per round, against FedIT's and the target's on the same updates
    out.append("\n### 4. FLoRA-NA run: the global step it takes vs FedIT's and the target's, on the same client updates\n")
    out.append("ΔP = B̂Â − B_gA_g (applied), ΔP̄ = B̄Ā − B_gA_g (FedIT), ΔT = T − B_gA_g (target). gain = ⟨ΔP, ΔT⟩/‖ΔT‖² "
               "(1 = the target's length along its direction). Mean over seeds.\n")
    rows = []
    for r in range(R):
        xs = rounds_of(na, r)
        a = [x["candidates"]["applied"] for x in xs]
        f = [x["candidates"]["fedit"] for x in xs]
        rows.append([r + 1, mean([c["norm_A_vs_fedit"] for c in a]), mean([c["norm_B_vs_fedit"] for c in a]),
                     mean([c["dA_vs_fedit"] for c in a]), mean([c["dB_vs_fedit"] for c in a]),
                     mean([c["step_vs_fedit"] for c in a]), mean([c["step_vs_target"] for c in a]),
                     mean([c["step_vs_target"] for c in f]), mean([c["gain"] for c in a]), mean([c["gain"] for c in f]),
                     mean([c["cos_target"] for c in a]), mean([c["cos_target"] for c in f]),
                     mean([c["divergence"] for c in a]), mean([c["divergence"] for c in f])])
    out.append(table(["round", "‖Â‖/‖Ā‖", "‖B̂‖/‖B̄‖", "‖Â−A_g‖/‖Ā−A_g‖", "‖B̂−B_g‖/‖B̄−B_g‖", "‖ΔP‖/‖ΔP̄‖",
                      "‖ΔP‖/‖ΔT‖", "‖ΔP̄‖/‖ΔT‖", "gain na", "gain fedit", "cos(ΔP, ΔT)", "cos(ΔP̄, ΔT)",
                      "divergence na", "divergence fedit"], rows))

    # 5. factor norms of the global adapter, both runs
    out.append("\n### 5. Global factor norms after each round (Frobenius over the 12 modules; mean over seeds)\n")
    rows = []
    for r in range(R):
        row = [r + 1]
        for m in METHODS:
            norm_a = mean([x["candidates"]["applied"]["norm_A"] for x in rounds_of(m, r)])
            norm_b = mean([x["candidates"]["applied"]["norm_B"] for x in rounds_of(m, r)])
            row += [norm_a, norm_b, norm_a / norm_b]
        svd = [x["candidates"]["svd"] for x in rounds_of(fe, r)]
        row += [mean([c["norm_A"] for c in svd]), mean([c["norm_B"] for c in svd])]
        rows.append(row)
    out.append(table(["round", "fedit ‖A‖", "fedit ‖B‖", "fedit ‖A‖/‖B‖", "flora-na ‖A‖", "flora-na ‖B‖",
                      "flora-na ‖A‖/‖B‖", "svd-of-fedit-updates ‖A‖", "… ‖B‖"], rows))
    M = runs[(fe, seeds[0])][0]["modules"]
    out.append(f"\nPer-module RMS = these / √{M} = these × {1 / math.sqrt(M):.3f}.\n")

    # 6. counterfactuals on the FedIT run's client updates
    for method in METHODS:
        out.append(f"\n### 6{'a' if method == fe else 'b'}. Counterfactuals on the {method} run's client updates "
                   f"(every round, every seed: {len(seeds) * R} aggregations)\n")
        if method == fe:
            out.append(f"Each candidate aggregates the very client updates FedIT aggregated. ×{DAMP} step: "
                       f"x = 1 + {DAMP}(x* − 1); clip: x = clamp(x*, {1 - CLIP}, {1 + CLIP}); "
                       + (f"ridge: flora-na with ridge={RIDGE:g}. " if HAS_RIDGE else "ridge: not in this library "
                          "version (get_method('flora-na').options has no 'ridge'), column skipped. ")
                       + (f"max_deviation: the library's step back along (1, 1) → (p*, q*) to |x − 1| ≤ {CLIP:g}. "
                          if HAS_MAX_DEV else "")
                       + "Mean over rounds and seeds; last three columns: round 8 only.\n")
        rows = []
        for c in cands:
            xs = [x["candidates"][c] for s in seeds for x in runs[(method, s)]]
            last = [runs[(method, s)][-1]["candidates"][c] for s in seeds]
            co = [x["coefficients"].get(c) for s in seeds for x in runs[(method, s)]]
            rng = (f"{min(k['p']['min'] for k in co):.2f} … {max(k['p']['max'] for k in co):.2f} / "
                   f"{min(k['q']['min'] for k in co):.2f} … {max(k['q']['max'] for k in co):.2f}") if co[0] else "1 / 1" if c == fe else "–"
            rows.append([c, mean([x["divergence"] for x in xs]), mean([x["step_vs_target"] for x in xs]),
                         mean([x["step_vs_fedit"] for x in xs]), mean([x["gain"] for x in xs]), mean([x["cos_target"] for x in xs]),
                         mean([x["norm_A_vs_fedit"] for x in xs]), mean([x["norm_B_vs_fedit"] for x in xs]), rng,
                         mean([x["divergence"] for x in last]), mean([x["step_vs_target"] for x in last]), mean([x["cos_target"] for x in last])])
        out.append(table(["candidate", "divergence", "‖ΔP‖/‖ΔT‖", "‖ΔP‖/‖ΔP̄‖", "gain", "cos(ΔP, ΔT)", "‖Â‖/‖Ā‖",
                          "‖B̂‖/‖B̄‖", "p range / q range", "r8 divergence", "r8 ‖ΔP‖/‖ΔT‖", "r8 cos"], rows))

    out.append("\n### 7. Divergence per round on the FedIT run's updates (mean over seeds)\n")
    rows = [[r + 1] + [mean([x["candidates"][c]["divergence"] for x in rounds_of(fe, r)]) for c in cands] for r in range(R)]
    out.append(table(["round"] + list(cands), rows))

    # 8. one-round counterfactual accuracy: same updates, same averaged head, only the aggregation differs
    def scored(method: str, c: str) -> bool:  # the run's own adapter, or scored in every round of every seed
        return c == method or all(c in x.get("counterfactual_eval", {}) for s in seeds for x in runs[(method, s)])

    def acc(x: dict[str, Any], method: str, c: str, key: str = "accuracy") -> float:
        return float(x[key]) if c == method else float(x["counterfactual_eval"][c][key])

    out.append("\n### 8. One-round counterfactual dev accuracy: each round's client updates and averaged head, scored "
               "with each aggregation's adapter\n")
    out.append("The applied candidate is the run's own accuracy. Δ vs fedit is paired per round and seed "
               f"({len(seeds) * R} pairs per run); wins / ties / losses count those pairs; escapes only this / only "
               f"fedit = pairs where one adapter's most-predicted share is < {COLLAPSE} and the other's is not.\n")
    rows = []
    for method in METHODS:
        for c in [c for c in cands if scored(method, c)]:
            xs = [x for s in seeds for x in runs[(method, s)]]
            d = [acc(x, method, c) - acc(x, method, fe) for x in xs] if scored(method, fe) else [math.nan]
            free = [(acc(x, method, c, "majority_share") < COLLAPSE, acc(x, method, fe, "majority_share") < COLLAPSE)
                    for x in xs] if scored(method, fe) else []
            rows.append([f"{method} run", c + (" (applied)" if c == method else ""), mean([acc(x, method, c) for x in xs]),
                         mean([acc(x, method, c, "majority_share") for x in xs]),
                         sum(acc(x, method, c, "majority_share") >= COLLAPSE for x in xs),
                         mean([acc(runs[(method, s)][-1], method, c) for s in seeds]), pm(d),
                         f"{sum(v > 0 for v in d)} / {sum(v == 0 for v in d)} / {sum(v < 0 for v in d)}",
                         f"{sum(a and not b for a, b in free)} / {sum(b and not a for a, b in free)}"])
    out.append(table(["updates from", "adapter", "mean acc", "mean maj share", f"rounds maj ≥ {COLLAPSE}", "r8 acc",
                      "Δ vs fedit (same round)", "wins / ties / losses", "escapes only this / only fedit"], rows))

    # 9. where the one-round difference comes from: split the same-update pairs by which adapter is out of collapse
    out.append(f"\n### 9. Where the one-round Δ (adapter − fedit) comes from: same-update pairs (both runs) split by "
               f"which adapter is out of the one-class state (most-predicted share < {COLLAPSE})\n")
    rows = []
    for c in [c for c in cands if c != fe and all(scored(m, c) and scored(m, fe) for m in METHODS)]:
        groups: dict[str, list[float]] = {"both out": [], "only fedit out": [], f"only {c} out": [], "neither": []}
        for method in METHODS:
            for x in (x for s in seeds for x in runs[(method, s)]):
                out_c, out_f = (acc(x, method, k, "majority_share") < COLLAPSE for k in (c, fe))
                key = "both out" if out_c and out_f else "only fedit out" if out_f else f"only {c} out" if out_c else "neither"
                groups[key].append(acc(x, method, c) - acc(x, method, fe))
        total = sum(len(v) for v in groups.values())
        for key, ds in groups.items():
            rows.append([c, key, len(ds), f"{mean(ds):+.3f}" if ds else "–", f"{sum(ds) / total:+.4f}"])
    out.append(table(["adapter", "pairs where", "pairs", "mean Δ acc", "contribution to the overall mean Δ"], rows))
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--rounds", type=int, default=HEADLINE_BASE["rounds"])
    parser.add_argument("--data-dir", default="../shared/data/glue")
    parser.add_argument("--out", type=Path, default=Path("results/flora_na_diagnosis"))
    parser.add_argument("--score", nargs="*", default=list(METHODS),
                        help="candidates whose adapter is also scored on the dev rows every round (each costs one "
                             f"evaluation per round; any of fedit, flora-na, svd{', ' + f'flora-na ridge={RIDGE:g}' if HAS_RIDGE else ''})")
    parser.add_argument("--tables-only", action="store_true", help="re-print the tables from <out>/records.json")
    args = parser.parse_args(argv)
    scorable = {"fedit", "flora-na", "svd"} | ({f"flora-na ridge={RIDGE:g}"} if HAS_RIDGE else set())
    if set(args.score) - scorable:
        parser.error(f"--score: unknown {sorted(set(args.score) - scorable)}; use any of {sorted(scorable)}")
    torch.set_num_threads(1)
    if os.environ.get("OMP_NUM_THREADS") != "1":
        print("note: OMP_NUM_THREADS is not 1; torch is still limited to one thread", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    records_path = args.out / "records.json"
    if args.tables_only:
        saved = json.loads(records_path.read_text())
    else:
        from fedlora.cli.commands import quiet_libraries

        quiet_libraries()
        saved = {"meta": provenance(sys.argv if argv is None else argv), "runs": []}
        for seed in args.seeds:
            for method in METHODS:
                saved["runs"].append(run_one(method, seed, args.rounds, args.data_dir, args.out, args.score))
                records_path.write_text(json.dumps(saved))  # after every run: a crash keeps what finished
    text = f"Commit: `{saved['meta']['git_describe']}`; FLoRA-NA sources sha256 {saved['meta']['sha256']}.\n\n" + tables(saved["runs"])
    (args.out / "tables.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
