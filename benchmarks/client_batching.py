"""Client batching throughput (issue 23 §4): K clients trained together vs one at a time vs one adapter.

    python benchmarks/client_batching.py                              # MiniLM shapes, 8 clients, CPU
    python benchmarks/client_batching.py --model qwen2.5-0.5b --batch 4 --seq 256 --device cuda --precision bf16
    python benchmarks/client_batching.py --model tiny-llama --clients 4 --steps 2   # seconds, for a smoke test

For K in --ks, the --clients clients train --steps local steps each in groups of K
(:func:`fedlora.models.client_batch.train_together`; K = 1 is the real sequential path,
:func:`fedlora.models.training.train_local`, the baseline). The limit row trains ONE adapter on the K_max
clients' batches concatenated (the frozen model does the same work; only the per-client LoRA/head maths and
optimizer state differ). Models are random-initialised from configs written here at the real shapes
(MiniLM-L6, Qwen2.5-0.5B, Llama-3.2-1B: throughput does not depend on the weights), so the script needs no
download and no data: torch, transformers and peft only. Rows are random tokens, every row --seq long.

Reported per K: client-steps/s, tokens/s (trained tokens: clients × steps × batch × seq / seconds), peak
device memory (CUDA only), and ratios against K = 1 and against the limit, all measured in this run after
one warm-up group. Also importable: ``main(argv) -> rows``.
"""

from __future__ import annotations

import argparse
import functools
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # fedlora from this checkout, installed or not
from fedlora.util.threads import add_threads_option, apply_threads, prefer_passive_wait  # noqa: E402

prefer_passive_wait()  # before torch loads: spinning OpenMP waits collapse a shared CPU (docs/llm_performance.md)
import torch  # noqa: E402

MODELS: dict[str, dict[str, Any]] = {
    # all-MiniLM-L6-v2's shapes (BERT, 22.7 M): LoRA on query/value, a 2-class head
    "minilm": dict(kind="bert", hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                   vocab_size=30522, targets=["query", "value"]),
    "tiny-bert": dict(kind="bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                      vocab_size=1000, targets=["query", "value"]),
    "tiny-llama": dict(kind="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=128, vocab_size=1000, targets=["q_proj", "v_proj"]),
    "qwen2.5-0.5b": dict(kind="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True,
                         targets=["q_proj", "v_proj"]),
    "llama-3.2-1b": dict(kind="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True,
                         targets=["q_proj", "v_proj"]),
}


def build(name: str, rank: int, device: torch.device) -> tuple[torch.nn.Module, Any, int]:
    """(PEFT model, its loss function, vocab size): random weights at ``name``'s shapes, LoRA rank ``rank``."""
    from peft import LoraConfig, get_peft_model
    from transformers import (BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    from fedlora.tasks.base import Task
    from fedlora.tasks.causal_lm import CausalLMTask

    spec = dict(MODELS[name])
    kind, targets = spec.pop("kind"), spec.pop("targets")
    torch.manual_seed(0)
    if kind == "bert":
        model = BertForSequenceClassification(BertConfig(**spec, num_labels=2))
        task_type, loss = "SEQ_CLS", functools.partial(Task.loss, None)  # the classification loss
    else:
        config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if kind == "llama" else (Qwen2Config, Qwen2ForCausalLM)
        model = model_cls(config_cls(**spec))
        task_type, loss = "CAUSAL_LM", functools.partial(CausalLMTask.loss, None)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets,
                                                  task_type=task_type))
    return peft_model.to(device), loss, int(spec["vocab_size"])


def batches(clients: int, steps: int, batch: int, seq: int, vocab: int, causal: bool) -> list[list[dict]]:
    """[client][step] batches of random tokens (labels: the tokens for a causal LM, a class otherwise)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(clients):
        rows = []
        for _ in range(steps):
            ids = torch.randint(5, vocab, (batch, seq), generator=g)
            labels = ids.clone() if causal else torch.randint(0, 2, (batch,), generator=g)
            rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
        out.append(rows)
    return out


def _rows(b: dict) -> int:
    return int(b["labels"].shape[0]) if b["labels"].dim() == 1 else int((b["labels"][:, 1:] != -100).sum())


def measure(model: torch.nn.Module, loss: Any, data: list[list[dict]], k: int, steps: int, runtime: Any,
            limit: bool = False) -> tuple[float, float | None]:
    """(seconds, peak GiB) for every client's ``steps`` steps in groups of ``k`` (``limit``: one adapter on the
    concatenation of each group's batches)."""
    from fedlora.aggregation import TrainingPolicy
    from fedlora.models.client_batch import ClientJob, stack_batches, train_together
    from fedlora.models.lora_state import get_adapter, get_head
    from fedlora.models.training import train_local

    start_adapter, start_head = get_adapter(model), get_head(model)
    cuda = runtime.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    for first in range(0, len(data), k):
        group = data[first:first + k]
        if limit:
            joined = [stack_batches([client[s] for client in group]) for s in range(steps)]
            train_local(model, iter(joined), steps, 1e-4, TrainingPolicy(), seed=0, runtime=runtime, loss_weight=_rows)
        elif k == 1:
            train_local(model, iter(group[0]), steps, 1e-4, TrainingPolicy(), seed=0, runtime=runtime,
                        loss_weight=_rows)
        else:
            jobs = [ClientJob(start_adapter, start_head, iter(client)) for client in group]
            train_together(model, jobs, steps, 1e-4, TrainingPolicy(), 0, loss=loss, loss_weight=_rows,
                           runtime=runtime)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return seconds, peak


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="minilm")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--ks", default="", help="group sizes, e.g. 1,2,4,8 (default: powers of 2 up to --clients)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    add_threads_option(parser)
    args = parser.parse_args(argv)
    threads = apply_threads(args.threads) if args.device == "cpu" else ""

    from fedlora.models.runtime import Runtime

    ks = [int(x) for x in args.ks.split(",")] if args.ks else [2**i for i in range(args.clients.bit_length())
                                                                 if 2**i <= args.clients]
    if ks[0] != 1:
        ks = [1, *ks]
    device = torch.device(args.device)
    runtime = Runtime(device, args.precision)
    model, loss, vocab = build(args.model, args.rank, device)
    data = batches(args.clients, args.steps, args.batch, args.seq, vocab, causal=MODELS[args.model]["kind"] != "bert")
    for k in (1, max(ks)):  # warm-up: first kernels, allocator, thread pools
        measure(model, loss, data[:k], k, 1, runtime)
    client_steps = args.clients * args.steps
    tokens = client_steps * args.batch * args.seq
    rows = []
    for k in ks:
        seconds, peak = measure(model, loss, data, k, args.steps, runtime)
        rows.append({"k": k, "seconds": seconds, "client_steps_s": client_steps / seconds, "tokens_s": tokens / seconds,
                     "peak_gib": peak})
    seconds, peak = measure(model, loss, data, max(ks), args.steps, runtime, limit=True)
    limit = {"k": f"one adapter ×{max(ks)}", "seconds": seconds, "client_steps_s": client_steps / seconds,
             "tokens_s": tokens / seconds, "peak_gib": peak}

    base = rows[0]["client_steps_s"]
    print(f"# client batching: {args.model}, r={args.rank}, {args.clients} clients × {args.steps} steps, batch "
          f"{args.batch} × {args.seq} tokens, {args.device} {args.precision}, torch {torch.__version__}, "
          f"{threads or f'{torch.get_num_threads()} threads'}, {platform.processor() or platform.machine()}")
    print("| K | seconds | client-steps/s | tokens/s | peak GiB | × K=1 | ÷ limit |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in [*rows, limit]:
        peak_text = f"{row['peak_gib']:.2f}" if row["peak_gib"] is not None else "-"
        print(f"| {row['k']} | {row['seconds']:.2f} | {row['client_steps_s']:.1f} | {row['tokens_s']:.0f} | "
              f"{peak_text} | {row['client_steps_s'] / base:.2f} | {limit['client_steps_s'] / row['client_steps_s']:.2f} |")
    return [*rows, limit]


if __name__ == "__main__":
    main()
