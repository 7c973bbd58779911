"""Input checks for aggregation: every problem names the client, the module and the fix.

Caller errors (a malformed global adapter, no updates) always raise. Per-client problems are
collected as ``(client_id, reason)`` pairs so that :func:`aggregate` can either raise them all at
once (``on_invalid="raise"``, the default) or drop those clients for the round
(``on_invalid="reject"``, for servers facing untrusted clients).

Devices: one aggregation runs on one device, the global adapter's (any: cpu, cuda:n, mps, meta).
Every tensor of the global adapter must sit on it (a caller error otherwise), and a client whose
tensors sit elsewhere is invalid (its reason names both devices). Tensors on the ``meta`` device
carry no values, so the value checks (finite values, update norms) are skipped for them.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import torch
from torch import Tensor

from fedlora.aggregation.types import Adapter, AggregationError, ClientUpdate, LoraPair


def _tensor_problem(name: str, t: object, ndim: int = 2) -> str | None:
    if not isinstance(t, Tensor):
        return f"{name} is a {type(t).__name__}, not a torch.Tensor"
    if not t.is_floating_point():
        return f"{name} has dtype {t.dtype}; LoRA factors must be floating point (float32 on the wire)"
    if t.ndim != ndim:
        return f"{name} has shape {tuple(t.shape)}; expected a {ndim}-D matrix"
    if not t.is_meta and not bool(torch.isfinite(t).all()):  # meta tensors have no values to check
        return f"{name} contains NaN or Inf values"
    return None


def adapter_device(adapter: Adapter) -> torch.device:
    """The device of an adapter's first factor: the device a (validated) aggregation runs on."""
    return next(iter(adapter.values())).A.device


def _pair_problem(module: str, pair: object, device: torch.device | None = None, where: str = "") -> str | None:
    """What is wrong with one module's pair; ``device``: where both factors must be (``where`` names it)."""
    if not isinstance(pair, LoraPair):
        return f"module {module!r}: expected a LoraPair(A, B), got {type(pair).__name__}"
    for label, t in (("A", pair.A), ("B", pair.B)):
        problem = _tensor_problem(f"module {module!r}: {label}", t)
        if problem:
            return problem
    if pair.A.device != pair.B.device:
        return (
            f"module {module!r}: A is on device {pair.A.device} but B is on device {pair.B.device}; "
            "both factors must be on one device"
        )
    if device is not None and pair.A.device != device:
        return (
            f"module {module!r}: A and B are on device {pair.A.device} but {where or 'the aggregation runs'} on "
            f"device {device}; every tensor of one aggregation must be on one device (move them with .to({str(device)!r}))"
        )
    if pair.B.shape[1] != pair.A.shape[0]:
        return (
            f"module {module!r}: B {tuple(pair.B.shape)} and A {tuple(pair.A.shape)} disagree on the rank "
            "(B must be (d, r) and A (r, k), PEFT's lora_B.weight and lora_A.weight)"
        )
    return None


def validate_global(global_adapter: Adapter) -> None:
    """Raise if the server's own adapter is malformed (a caller error, never a client's)."""
    if not isinstance(global_adapter, dict) or not global_adapter:
        raise AggregationError("the global adapter must be a non-empty dict {module name: LoraPair}")
    device: torch.device | None = None
    for module, pair in global_adapter.items():
        problem = _pair_problem(module, pair, device, "the global adapter's first module is")
        if problem:
            raise AggregationError(f"global adapter: {problem}")
        if device is None:
            device = pair.A.device


MAX_NUM_EXAMPLES = 10**9  # beyond any real client: a larger count is a weight grab, not data


def update_problems(global_adapter: Adapter, update: object, max_num_examples: int = MAX_NUM_EXAMPLES) -> list[str]:
    """Everything wrong with one client update, as readable reasons (empty list: valid).

    ``global_adapter`` must be valid (:func:`validate_global`): its device is the one every
    client tensor must be on.
    """
    if not isinstance(update, ClientUpdate):
        return [f"expected a ClientUpdate(adapter, num_examples, client_id), got {type(update).__name__}"]
    problems: list[str] = []
    n = update.num_examples
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        problems.append(f"num_examples={n!r}; it must be a positive int (the client's training examples)")
    elif n > max_num_examples:
        problems.append(f"num_examples={n} is implausible (limit {max_num_examples}); it would dominate every weighted average")
    adapter = update.adapter
    if not isinstance(adapter, dict):
        return problems + [f"adapter is a {type(adapter).__name__}, not a dict {{module: LoraPair}}"]
    missing = sorted(set(global_adapter) - set(adapter))
    extra = sorted(set(adapter) - set(global_adapter))
    if missing:
        problems.append(f"missing modules {missing[:3]}{'...' if len(missing) > 3 else ''} ({len(missing)} in all)")
    if extra:
        problems.append(f"unknown modules {extra[:3]}{'...' if len(extra) > 3 else ''} not in the global adapter")
    device = adapter_device(global_adapter)
    for module in sorted(set(adapter) & set(global_adapter)):
        pair = adapter[module]
        problem = _pair_problem(module, pair, device, "the global adapter is")
        if problem:
            problems.append(problem)
            continue
        ref = global_adapter[module]
        if pair.A.shape != ref.A.shape or pair.B.shape != ref.B.shape:
            problems.append(
                f"module {module!r}: A {tuple(pair.A.shape)}, B {tuple(pair.B.shape)} but the global adapter has "
                f"A {tuple(ref.A.shape)}, B {tuple(ref.B.shape)} (rank {ref.rank}); clients must use the same "
                "rank and target modules as the server"
            )
    return problems


def client_key(update: object, index: int) -> str:
    return str(getattr(update, "client_id", f"#{index}"))


def collect_problems(
    global_adapter: Adapter, updates: Sequence[ClientUpdate], max_num_examples: int = MAX_NUM_EXAMPLES
) -> list[tuple[str, str]]:
    """``(client_id, reason)`` for every invalid update, including duplicate client ids."""
    found: list[tuple[str, str]] = []
    seen: set[str] = set()
    for index, update in enumerate(updates):
        client = client_key(update, index)
        for reason in update_problems(global_adapter, update, max_num_examples):
            found.append((client, reason))
        if client in seen:
            found.append((client, "duplicate client_id in this round's updates"))
        seen.add(client)
    return found


def format_problems(problems: Sequence[tuple[str, str]]) -> str:
    return "; ".join(f"client {client!r}: {reason}" for client, reason in problems)


def update_norm(global_adapter: Adapter, update: ClientUpdate) -> float:
    """‖update − global‖_F over every module and both factors (float64)."""
    total = 0.0
    for module, ref in global_adapter.items():
        pair = update.adapter[module]
        total += float(((pair.A.double() - ref.A.double()) ** 2).sum() + ((pair.B.double() - ref.B.double()) ** 2).sum())
    return total**0.5


def norm_outliers(global_adapter: Adapter, updates: Sequence[ClientUpdate], bound: float) -> list[tuple[str, str]]:
    """Clients whose update norm exceeds ``bound`` × the round's median norm (scaled-up or poisoned updates).

    Only meaningful with a nonzero median: if most clients did not move, nothing is compared.
    Nothing is compared on the ``meta`` device either: it has no values.
    """
    if adapter_device(global_adapter).type == "meta":
        return []
    norms = [update_norm(global_adapter, u) for u in updates]
    median = statistics.median_low(norms) if norms else 0.0  # the lower middle value, as torch.median
    if median <= 0:
        return []
    return [
        (client_key(u, i), f"update norm {n:.4g} is more than {bound:g}x the round's median {median:.4g}")
        for i, (u, n) in enumerate(zip(updates, norms))
        if n > bound * median
    ]
