"""Client batching: K clients train together, one forward/backward through the shared frozen model per step.

Every LoRA layer holds the K clients' adapters stacked, A (K, r, k) and B (K, d, r); a step's input is the
K clients' batches stacked row-wise (client k owns rows k·b … (k+1)·b − 1), and each layer adds
``s · B_k A_k x_k`` to the frozen output of its own segment with two batched matmuls (PEFT's own LoRA path
is switched off meanwhile). The head (PEFT ``modules_to_save``) is applied per client the same way, with
``torch.func.vmap`` over its stacked parameters. Why this equals training the clients one after another:

- each client's loss is its own mean (:meth:`fedlora.tasks.Task.loss` on its rows of the logits), and the
  step minimises their sum, so client k's parameters receive exactly client k's gradient (no other
  client's rows touch them);
- AdamW and its decoupled weight decay are elementwise, so one AdamW over the stacked tensors is K
  independent AdamWs with the same step count; the lr schedule is shared (same steps);
- gradient clipping scales each client by its own global norm (``torch.nn.utils.clip_grad_norm_``'s
  formula per client); gradient accumulation weights each client's micro-batch losses by its own shares.

Equal up to float rounding (fp32 CPU: ~1e-6 relative; ``tests/unit/models/test_client_batch.py``), with two
stated differences: dropout masks are drawn for the stacked batch from the first client's seed, so with
dropout the clients see other (equally distributed) masks than alone; and fp16 loss scaling is refused
(one client's overflow would skip every client's step): use bf16 or ``--client-batch 1``.
Clients' batches of different lengths are padded on the right to the longest (masked, labels ignored).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.func import functional_call

from fedlora.aggregation.types import Adapter, LoraPair, TrainingPolicy
from fedlora.models.lora_state import active_adapter_name, head_parameters, head_wrappers, lora_layers
from fedlora.models.optim import LocalOptim
from fedlora.models.runtime import Runtime, runtime_of
from fedlora.models.training import split_batch

LossFn = Callable[[Tensor, Tensor], Tensor]  # (logits of one client's rows, their labels) -> mean loss
PAD_VALUES = {"labels": -100, "attention_mask": 0}  # anything else (input ids, token types) pads with 0


@dataclass
class ClientJob:
    """One client of a batched group: where it starts and the batches it trains on."""

    adapter: Adapter  # its start, {module: LoraPair(A (r, k), B (d, r))}
    head: dict[str, Tensor]  # its start head ({} for a causal LM)
    batches: Iterator[dict[str, Any]]  # at least ``steps`` batches, all of the same row count


@dataclass
class ClientOutcome:
    """What one client of the group ends with (CPU float32), as :func:`fedlora.models.training.train_local` reports."""

    adapter: Adapter
    head: dict[str, Tensor]
    loss: float  # mean over steps of its own step loss
    steps: int
    examples: int


def stack_batches(batches: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The clients' batches as one, row-wise, each (b, L_k, …) tensor right-padded to the longest L."""
    out: dict[str, Any] = {}
    for key, first in batches[0].items():
        if not isinstance(first, Tensor):
            raise TypeError(f"batch value {key!r} is a {type(first).__name__}; client batching stacks tensors only")
        parts = [b[key] for b in batches]
        if first.dim() >= 2:
            length = max(p.shape[1] for p in parts)
            fill = PAD_VALUES.get(key, 0)
            parts = [p if p.shape[1] == length else torch.nn.functional.pad(
                p, (0, 0) * (p.dim() - 2) + (0, length - p.shape[1]), value=fill) for p in parts]
        out[key] = torch.cat(parts)  # (K·b, ...)
    return out


class _Stacked:
    """The group's trainable state: stacked LoRA factors and heads, installed on the model by hooks."""

    def __init__(self, model: nn.Module, starts: Sequence[tuple[Adapter, dict[str, Tensor]]],
                 device: torch.device) -> None:
        """``starts[k]``: client k's (adapter, head)."""
        self.k = len(starts)
        self.name = active_adapter_name(model)
        self.layers = lora_layers(model)
        self.A: dict[str, nn.Parameter] = {}
        self.B: dict[str, nn.Parameter] = {}
        for m, layer in self.layers.items():
            dtype = layer.lora_A[self.name].weight.dtype
            self.A[m] = nn.Parameter(torch.stack([a[m].A for a, _ in starts]).to(device, dtype))  # (K, r, k)
            self.B[m] = nn.Parameter(torch.stack([a[m].B for a, _ in starts]).to(device, dtype))  # (K, d, r)
        live = head_parameters(model)
        self.head = {key: nn.Parameter(torch.stack([h[key] for _, h in starts]).to(device, p.dtype))  # (K, ...)
                     for key, p in live.items()}
        self.hooks: list[Any] = []

    def install(self, model: nn.Module) -> None:
        for m, layer in self.layers.items():
            layer.enable_adapters(False)  # the frozen output only; the hook adds each client's own delta
            self.hooks.append(layer.register_forward_hook(self._lora_hook(m, layer)))
        for prefix, wrapper in head_wrappers(model).items():
            inner = wrapper.modules_to_save[self.name]
            params = {pname: self.head[f"{prefix}.{pname}"] for pname, _ in inner.named_parameters()}
            self.hooks.append(wrapper.register_forward_hook(self._head_hook(inner, params)))

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()
        for layer in self.layers.values():
            layer.enable_adapters(True)

    def _lora_hook(self, module: str, layer: nn.Module) -> Callable[..., Tensor]:
        A, B = self.A[module], self.B[module]
        dropout = layer.lora_dropout[self.name]
        scaling = float(layer.scaling[self.name])

        def hook(_: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
            x = dropout(args[0].to(A.dtype))
            xs = x.reshape(self.k, -1, x.shape[-1])  # (K, b·L, k): client k's rows, flattened
            delta = torch.bmm(torch.bmm(xs, A.transpose(1, 2)), B.transpose(1, 2))  # (K, b·L, d)
            return output + (delta * scaling).reshape(output.shape).to(output.dtype)

        return hook

    def _head_hook(self, inner: nn.Module, params: dict[str, Tensor]) -> Callable[..., Tensor]:
        def one(p: dict[str, Tensor], x: Tensor) -> Tensor:
            return cast(Tensor, functional_call(inner, p, (x,)))

        batched = torch.func.vmap(one, randomness="different")

        def hook(_: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
            x = args[0]
            out = batched(params, x.reshape(self.k, -1, *x.shape[1:]))  # (K, b, ...)
            return out.reshape(output.shape)

        return hook

    def trainable(self, policy: TrainingPolicy) -> list[nn.Parameter]:
        """The parameters the policy trains (frozen factors stay out of AdamW, so they stay bit-identical)."""
        params = list(self.head.values())
        params += list(self.A.values()) if policy.train_A else []
        params += list(self.B.values()) if policy.train_B else []
        return params

    def outcome(self, k: int) -> tuple[Adapter, dict[str, Tensor]]:
        def export(t: Tensor) -> Tensor:
            return t[k].detach().to(device="cpu", dtype=torch.float32, copy=True)

        adapter = {m: LoraPair(A=export(self.A[m]), B=export(self.B[m])) for m in self.layers}
        return adapter, {key: export(p) for key, p in self.head.items()}


def clip_per_client(params: Sequence[Tensor], max_norm: float) -> None:
    """``clip_grad_norm_`` for each client separately: client k's gradients (index k of every stacked
    tensor) are scaled by ``min(1, max_norm / (‖g_k‖ + 1e-6))``, ‖g_k‖ its global L2 norm."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    per_param = torch.stack([g.reshape(g.shape[0], -1).norm(dim=1) for g in grads])  # (P, K)
    norms = per_param.norm(dim=0)  # (K,)
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)  # (K,)
    for g in grads:
        g.mul_(coef.reshape(-1, *([1] * (g.dim() - 1))).to(g.dtype))


def train_together(
    model: nn.Module,
    jobs: Sequence[ClientJob],
    steps: int,
    lr: float,
    policy: TrainingPolicy,
    seed: int,
    loss: LossFn,
    loss_weight: Callable[[dict[str, Any]], int],
    optim: LocalOptim | None = None,
    runtime: Runtime | None = None,
    micro_batches: int = 1,
) -> list[ClientOutcome]:
    """Train ``jobs`` together for ``steps`` steps (see the module docstring); one outcome per job, in order.

    The same contract as :func:`fedlora.models.training.train_local` per client: a fresh AdamW, frozen
    factors excluded, ``optim``'s decay/clipping/schedule, ``micro_batches`` pieces weighted by
    ``loss_weight``. The model's own adapter and head are left as they were.
    """
    if not jobs:
        return []
    runtime = runtime or runtime_of(model)
    if runtime.grad_scaler() is not None:
        raise ValueError("client batching does not support fp16 loss scaling (one client's overflow would skip "
                         "every client's step); use --precision bf16 or --client-batch 1")
    optim = optim or LocalOptim()
    stacked = _Stacked(model, [(job.adapter, job.head) for job in jobs], runtime.device)
    frozen = {p: p.requires_grad for p in model.parameters()}
    losses: list[list[float]] = [[] for _ in jobs]
    examples = [0] * len(jobs)
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        stacked.install(model)
        params = stacked.trainable(policy)
        if not params:
            raise ValueError("nothing to train: policy freezes both A and B and the model has no head")
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=optim.weight_decay)
        torch.manual_seed(seed)  # dropout masks (drawn for the whole stack)
        model.train()
        for step in range(steps):
            batches = [_next(job.batches, step, steps) for job in jobs]
            pieces = [split_batch(runtime.to_device(b), micro_batches) for b in batches]  # [client][piece]
            weights = [[float(loss_weight(p)) for p in client] for client in pieces]
            optimizer.zero_grad(set_to_none=True)
            if optim.scheduled:
                for group in optimizer.param_groups:
                    group["lr"] = optim.lr_at(lr, step)
            step_loss = [0.0] * len(jobs)
            for j in range(micro_batches):
                together = stack_batches([client[j] for client in pieces])
                labels = together.pop("labels")
                rows = [int(client[j]["labels"].shape[0]) for client in pieces]
                with runtime.autocast():
                    logits = model(**together).logits  # (K·b, ...)
                bounds = [0, *itertools.accumulate(rows)]
                owns = torch.stack([loss(logits[bounds[k]:bounds[k + 1]], labels[bounds[k]:bounds[k + 1]])
                                    for k in range(len(rows))])  # (K,): each client's own mean loss
                shares = [weights[k][j] / sum(weights[k]) if micro_batches > 1 else 1.0 for k in range(len(rows))]
                (owns * torch.tensor(shares, dtype=owns.dtype, device=owns.device)).sum().backward()
                for k, value in enumerate(owns.detach().tolist()):  # one host sync per micro-batch, not per client
                    step_loss[k] += value * shares[k]
            if optim.max_grad_norm > 0:
                clip_per_client(params, optim.max_grad_norm)
            optimizer.step()
            for k, batch in enumerate(batches):
                losses[k].append(step_loss[k])
                examples[k] += int(batch["labels"].shape[0])
    finally:
        stacked.remove()
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        model.eval()
    outcomes = []
    for k in range(len(jobs)):
        adapter, head = stacked.outcome(k)
        mean = sum(losses[k]) / len(losses[k]) if losses[k] else math.nan
        outcomes.append(ClientOutcome(adapter, head, mean, len(losses[k]), examples[k]))
    return outcomes


def predict_together(
    model: nn.Module, states: Sequence[tuple[Adapter, dict[str, Tensor]]], loaders: Sequence[Iterable[dict[str, Any]]],
    runtime: Runtime | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """Each client's (logits, labels) over its own loader, the clients' batches in one forward pass per step.

    ``states[k]``: client k's (adapter, head). Step j stacks every client's j-th batch; a client whose loader ran
    out, or whose batch is shorter, is padded with copies of its own rows, whose outputs are dropped. The model's
    own adapter and head are left as they were. CPU float32 logits, as :func:`fedlora.models.training.evaluate`.
    """
    runtime = runtime or runtime_of(model)
    stacked = _Stacked(model, states, runtime.device)
    iterators = [iter(loader) for loader in loaders]
    outputs: list[list[Tensor]] = [[] for _ in states]
    labels: list[list[Tensor]] = [[] for _ in states]
    fillers: list[dict[str, Any] | None] = [None] * len(states)
    was_training = model.training
    try:
        stacked.install(model)
        model.eval()
        with torch.inference_mode():
            while True:
                batches: list[dict[str, Any] | None] = [next(it, None) for it in iterators]
                if all(b is None for b in batches):
                    break
                for k, b in enumerate(batches):
                    if b is not None and fillers[k] is None:
                        fillers[k] = b
                rows = [int(b["labels"].shape[0]) if b is not None else 0 for b in batches]
                width = max(rows)
                filled = [_fill(b if b is not None else fillers[k], width) for k, b in enumerate(batches)]
                together = runtime.to_device(stack_batches(filled))
                together.pop("labels")
                with runtime.autocast():
                    logits = model(**together).logits.float().cpu()  # (K·width, C)
                for k, n in enumerate(rows):
                    if n:
                        outputs[k].append(logits[k * width:k * width + n])
                        labels[k].append(torch.as_tensor(batches[k]["labels"]).cpu())  # type: ignore[index]
    finally:
        stacked.remove()
        model.train(was_training)
    return [(torch.cat(o) if o else torch.zeros(0), torch.cat(y) if y else torch.zeros(0)) for o, y in zip(outputs, labels)]


def _fill(batch: dict[str, Any] | None, rows: int) -> dict[str, Any]:
    """``batch`` with its rows repeated cyclically up to ``rows`` (padding rows whose outputs are dropped)."""
    assert batch is not None  # a client with no batch at all was given no loader rows; the caller never stacks it
    n = int(batch["labels"].shape[0])
    if n == rows:
        return batch
    index = torch.arange(rows) % n
    return {k: v[index] if isinstance(v, Tensor) else v for k, v in batch.items()}


def _next(batches: Iterator[dict[str, Any]], step: int, steps: int) -> dict[str, Any]:
    try:
        return next(batches)
    except StopIteration:
        raise ValueError(f"batch iterator ran out after {step} of {steps} steps; pass a cycling iterator") from None
