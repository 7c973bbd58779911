"""FedSA-LoRA's private B at 10,000 clients: the server's memory and per-round checkpoint cost, in memory vs on disk.

Before :mod:`fedlora.protocol.private_store` the server kept every client's B in RAM and wrote all of them into the
checkpoint every round; now each client's B is one file, written when that client trains, and the checkpoint holds
an index. This script builds both at MiniLM shapes (12 LoRA modules, d = 384, r = 8: 147 KB of B per client) for
U clients that have all trained, then times one round in which ``--sampled`` of them train again, and prints a table
with the ratio (the baseline is measured in the same run).

    python benchmarks/private_store.py                   # U = 10,000, 10 sampled per round (1.5 GB of B)
    python benchmarks/private_store.py --clients 2000    # smaller
"""

from __future__ import annotations

import argparse
import gc
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch

from fedlora.aggregation import LoraPair
from fedlora.protocol.checkpoint import ServerState, load_state, save_state
from fedlora.protocol.private_store import PrivateStore

MODULES, D, R = 12, 384, 8


def b_factors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layer.{i // 2}.{'query' if i % 2 == 0 else 'value'}": torch.randn(D, R, generator=g) for i in range(MODULES)}


def state(store: PrivateStore, round_: int) -> ServerState:
    adapter = {m: LoraPair(A=torch.zeros(R, D), B=torch.zeros(D, R)) for m in b_factors(0)}
    return ServerState(round=round_, adapter=adapter, head={}, history=[{"round": r} for r in range(1, round_ + 1)],
                       private=store)


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak, KiB on Linux


def measure(kind: str, clients: int, sampled: int, root: Path) -> dict[str, float]:
    out = root / kind
    out.mkdir()
    store = PrivateStore(out / "private" if kind == "on disk" else None)
    one = b_factors(0)  # the same tensor content for every client: the cost is in how many, not what
    for u in range(clients):  # every client has trained once (round 1)
        store.put(f"client-{u}", {m: t.clone() for m, t in one.items()} if kind == "in memory" else one, round_=1)
    save_state(state(store, 1), out)
    store.commit()
    gc.collect()
    start = time.perf_counter()  # round 2: `sampled` clients read their B, train, and store it; the checkpoint
    for u in range(sampled):
        got = store.get(f"client-{u}")
        assert got is not None
        store.put(f"client-{u}", {m: t + 1 for m, t in got.items()}, round_=2)
    save_state(state(store, 2), out)
    store.commit()
    round_seconds = time.perf_counter() - start
    start = time.perf_counter()
    back = load_state(out)  # what --resume reads
    load_seconds = time.perf_counter() - start
    assert len(back.private) == clients
    checkpoint_mb = (out / "checkpoint.safetensors").stat().st_size / 1e6
    del store, back
    gc.collect()
    return {"round_s": round_seconds, "resume_load_s": load_seconds, "checkpoint_MB": checkpoint_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--sampled", type=int, default=10)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fedlora-private-"))
    try:
        rows = {}
        base_rss = rss_gib()
        rows["on disk"] = measure("on disk", args.clients, args.sampled, root)
        rows["on disk"]["peak_RSS_GiB"] = rss_gib() - base_rss  # before the in-memory run raises the peak
        rows["in memory"] = measure("in memory", args.clients, args.sampled, root)
        rows["in memory"]["peak_RSS_GiB"] = rss_gib() - base_rss
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"FedSA-LoRA private B: U = {args.clients:,} clients (MiniLM shapes, r = {R}: "
          f"{MODULES * D * R * 4 / 1e3:.0f} KB each), {args.sampled} trained in the measured round")
    print("| layout | round (s) | checkpoint (MB) | resume load (s) | peak RSS growth (GiB) |")
    print("|---|---|---|---|---|")
    for kind, row in rows.items():
        print(f"| {kind} | {row['round_s']:.2f} | {row['checkpoint_MB']:.1f} | {row['resume_load_s']:.2f} | "
              f"{row['peak_RSS_GiB']:.2f} |")
    disk, memory = rows["on disk"], rows["in memory"]
    print(f"ratio in memory / on disk: round {memory['round_s'] / disk['round_s']:.1f}x, checkpoint "
          f"{memory['checkpoint_MB'] / disk['checkpoint_MB']:.0f}x, resume load "
          f"{memory['resume_load_s'] / disk['resume_load_s']:.1f}x")


if __name__ == "__main__":
    main()
