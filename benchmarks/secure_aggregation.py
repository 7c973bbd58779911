"""What SecAgg+ costs per round against the plain Flower round: wall time and bytes on the wire, both directions.

Runs the real ServerApp and ClientApps in this process (the test suite's in-process grid: every message
serialised to Flower's protobuf and back), plain and with ``secure-aggregation=true``, same config and seed, and
counts the serialised size of every message each way (SecAgg+'s masked vectors travel as integers in
ConfigRecords, its key exchange as extra messages). Prints a table and the ratios.

    python benchmarks/secure_aggregation.py [--clients 3] [--rounds 2] [--model PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default="", help="a local model folder (default: the bundled MiniLM)")
    args = parser.parse_args()

    import torch
    from flwr.app import Context, RecordDict
    from flwr.common.config import get_fused_config_from_dir, parse_config_args
    from flwr.common.serde import message_to_proto
    from flwr.supercore.task_identity import TaskIdentity

    import tests.integration.test_flower_simulation as sim
    from fedlora.config.run import RunConfig
    from fedlora.engines.flower import client_app
    from fedlora.engines.flower.server_app import app as server_app

    sent: dict[str, int] = {"down": 0, "up": 0, "messages": 0}
    deliver = sim.InProcessGrid.send_and_receive

    def counting(self, messages, *, timeout=None):
        messages = list(messages)
        sent["down"] += sum(message_to_proto(m).ByteSize() for m in messages)
        replies = deliver(self, messages, timeout=timeout)
        sent["up"] += sum(message_to_proto(m).ByteSize() for m in replies)
        sent["messages"] += len(messages) + len(replies)
        return replies

    sim.InProcessGrid.send_and_receive = counting
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = sim.RUN_ID, 0, 1  # what a running ServerApp sets
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for secure in (False, True):
            config = RunConfig(task="toy", model=args.model or None, clients=args.clients, rounds=args.rounds,
                               alpha=0.5, local_steps=2, batch_size=8, max_length=32, eval_local_every=0,
                               max_eval_examples=32, method="fedit", clip_factor=0.0, out=f"{tmp}/{secure}")
            overrides = sim.flower_overrides(config, secure_aggregation=secure)
            run_config = get_fused_config_from_dir(REPO, parse_config_args([overrides]))
            client_app._CACHE.clear()
            grid = sim.InProcessGrid(run_config, config.clients)
            sent.update(down=0, up=0, messages=0)
            torch.set_num_threads(1)
            start = time.perf_counter()
            server_app(grid, Context(run_id=sim.RUN_ID, node_id=0, node_config={}, state=RecordDict(),
                                     run_config=run_config))
            wall = time.perf_counter() - start
            records = [json.loads(line) for line in Path(config.out, "metrics.jsonl").read_text().splitlines()]
            rows.append({"mode": "SecAgg+" if secure else "plain", "round_s": sum(r["wall_seconds"] for r in records) / len(records),
                         "wall_s": wall, "down_kb": sent["down"] / 1e3 / len(records), "up_kb": sent["up"] / 1e3 / len(records),
                         "messages": sent["messages"] / len(records), "accuracy": records[-1]["global_metric"]})
    print("| mode | s per round | MB down per round | MB up per round | messages per round | final accuracy |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['round_s']:.2f} | {r['down_kb'] / 1e3:.3f} | {r['up_kb'] / 1e3:.3f} | "
              f"{r['messages']:.0f} | {r['accuracy']:.4f} |")
    plain, secure = rows
    print(f"\nSecAgg+ / plain: time per round {secure['round_s'] / plain['round_s']:.2f}x, bytes down "
          f"{secure['down_kb'] / plain['down_kb']:.2f}x, bytes up {secure['up_kb'] / plain['up_kb']:.2f}x "
          f"({args.clients} clients, {args.rounds} rounds, fedit, toy task)")


if __name__ == "__main__":
    main()
