"""Input checks for aggregation: every problem names the client, the module and the fix.

Caller errors (a malformed global adapter, no updates) always raise. Per-client problems are
collected as ``(client_id, reason)`` pairs so that :func:`aggregate` can either drop those clients
for the round (``on_invalid="reject"``, the default, for servers facing untrusted clients) or raise
them all at once (``on_invalid="raise"``). Update norms are compared with the round's reference norm
(:func:`round_norms`; :mod:`fedlora.aggregation.robust` has the threat model and the fallback),
each measured from what its client was sent (with mixed client ranks, its rank-r_u start).

Devices: one aggregation runs on one device, the global adapter's (any: cpu, cuda:n, mps, meta).
Every tensor of the global adapter must sit on it (a caller error otherwise), and a client whose
tensors sit elsewhere is invalid (its reason names both devices). Tensors on the ``meta`` device
carry no values, so the value checks (finite values, update norms) are skipped for them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fedlora.aggregation.robust import delta_norm, own_norm, reference_norm
from fedlora.aggregation.types import Adapter, AggregationError, ClientUpdate, LoraPair

# The floating dtypes the server computes with; float8 and friends have no isfinite, no matmul.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor_problem(name: str, t: object, ndim: int | None = 2) -> str | None:
    """What is wrong with one tensor a client sent (None: fine); ``ndim`` None: any number of dims."""
    if not isinstance(t, Tensor):
        return f"{name} is a {type(t).__name__}, not a torch.Tensor"
    if t.layout != torch.strided:
        return f"{name} is a {t.layout} tensor; send dense tensors (.to_dense())"
    if not t.is_floating_point():
        return f"{name} has dtype {t.dtype}; LoRA factors must be floating point (float32 on the wire)"
    if t.dtype not in FLOAT_DTYPES:
        return f"{name} has dtype {t.dtype}; use float32, float16, bfloat16 or float64"
    if ndim is not None and t.ndim != ndim:
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
        problem = tensor_problem(f"module {module!r}: {label}", t)
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
        if not isinstance(module, str):
            raise AggregationError(f"global adapter: module name {module!r} is a {type(module).__name__}; use str names")
        problem = _pair_problem(module, pair, device, "the global adapter's first module is")
        if problem:
            raise AggregationError(f"global adapter: {problem}")
        if 0 in pair.B.shape or 0 in pair.A.shape:
            raise AggregationError(f"global adapter: module {module!r} has A {tuple(pair.A.shape)}, B "
                                   f"{tuple(pair.B.shape)}; the rank and both dimensions must be >= 1")
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
    if not isinstance(update.client_id, str) or not update.client_id:
        problems.append(f"client_id={update.client_id!r}; it must be a non-empty string")
    n = update.num_examples
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        problems.append(f"num_examples={n!r}; it must be a positive int (the client's training examples)")
    elif n > max_num_examples:
        problems.append(f"num_examples={n} is implausible (limit {max_num_examples}); it would dominate every weighted average")
    adapter = update.adapter
    if not isinstance(adapter, dict):
        return problems + [f"adapter is a {type(adapter).__name__}, not a dict {{module: LoraPair}}"]
    missing = sorted(set(global_adapter) - set(adapter), key=repr)
    extra = sorted(set(adapter) - set(global_adapter), key=repr)  # names of any type, even mixed
    if missing:
        problems.append(f"missing modules {missing[:3]}{'...' if len(missing) > 3 else ''} ({len(missing)} in all)")
    if extra:
        problems.append(f"unknown modules {extra[:3]}{'...' if len(extra) > 3 else ''} not in the global adapter")
    device = adapter_device(global_adapter)
    for module in sorted(set(adapter) & set(global_adapter), key=repr):
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
    """The name a client is reported under: its id as a string (``#index`` when it has none)."""
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


def update_norm(start: Adapter, update: ClientUpdate) -> float:
    """‖update − start‖_F over every module and both factors (float64); ``start``: what the client was sent."""
    return delta_norm([(update.adapter[m].A, ref.A) for m, ref in start.items()]
                      + [(update.adapter[m].B, ref.B) for m, ref in start.items()])


def adapter_norm(adapter: Adapter) -> float:
    """‖adapter‖_F over every module and both factors (float64): the fallback reference scale."""
    return own_norm([t for p in adapter.values() for t in (p.A, p.B)])


def round_norms(
    global_adapter: Adapter, updates: Sequence[ClientUpdate], starts: Sequence[Adapter] | None = None
) -> tuple[list[float], float, bool]:
    """(each update's norm, the round's reference norm, whether it is the round's median).

    Each update is measured from its ``starts`` entry, what its client was sent (default: the
    global adapter; a lower-rank client's start is :func:`fedlora.aggregation.ranks.sent_start`), so
    the norms measure training, not the rank mapping. See
    :func:`fedlora.aggregation.robust.reference_norm`: with one client or a zero median the
    reference is the global adapter's own norm, so the bound never switches itself off.
    """
    starts = [global_adapter] * len(updates) if starts is None else starts
    norms = [update_norm(start, u) for start, u in zip(starts, updates)]
    reference, from_round = reference_norm(norms, adapter_norm(global_adapter))
    return norms, reference, from_round


def norm_outliers(
    names: Sequence[str], norms: Sequence[float], reference: float, from_round: bool, bound: float
) -> list[tuple[str, str]]:
    """``(client, reason)`` for every norm above ``bound`` × ``reference`` (scaled-up or poisoned updates)."""
    what = "the round's median" if from_round else "the fallback reference (the global's own norm, at least 1)"
    return [
        (name, f"update norm {n:.4g} is more than {bound:g}x {what} {reference:.4g}")
        for name, n in zip(names, norms)
        if not n <= bound * reference  # NaN-safe
    ]
