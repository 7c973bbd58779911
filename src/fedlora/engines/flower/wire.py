"""What travels between ServerApp and ClientApps: the typed messages as float32 ArrayRecords with stable keys.

A TRAIN message is a :class:`~fedlora.engines.flower.messages.TrainDownload` (:func:`download_content`,
:func:`read_download`), its reply a :class:`~fedlora.engines.flower.messages.TrainReply` (:func:`reply_content`;
the server reads replies only through :func:`fedlora.engines.flower.replies.parse_train_reply`). The records:

* ``"arrays"`` (both ways): the LoRA factors that travel under the method's
  :class:`~fedlora.aggregation.TrainingPolicy` (A if ``upload_A``, B if ``upload_B``), under PEFT's
  own state-dict names (:func:`fedlora.models.lora_state.adapter_to_state_dict`,
  ``base_model.model.<module>.lora_A.weight``), plus the classifier head under
  ``base_model.model.<head key>`` -- the names PEFT writes into ``adapter_model.safetensors``.
  A factor that does not travel is rebuilt by the receiver (:func:`record_to_model`'s ``missing_from``);
  the one exception: a FedSA-LoRA client with no B of its own after round 1 is sent the server's B.
* ``"eval-B"`` (up only, FedSA-LoRA): the client's B, which the protocol keeps local; uploaded only
  because the server evaluates a global model with B = mean of the clients' B, as the local engine does.
* ``"base-delta"`` (down only, FedEx-LoRA): the product-space (d, k) residuals the client
  has not merged yet, keyed ``"<round>/<module>"`` so the client replays them in order, exactly
  as the local engine merged them.
* ``"base-factors"`` (down only, FLoRA): the same for FLoRA's merges, as the paper sends them: the
  stacked factors B_stack (d, U r) and A_stack (U r, k), keyed ``"<round>/<module>/B"`` and ``.../A``;
  the client multiplies them (U·r·(d + k) floats instead of d·k). FLoRA's ``"arrays"`` carry no
  LoRA factors: the global adapter is a re-init the client draws from the seed in the config.
* ``"local-B"`` (``context.state`` only, FedSA-LoRA): the client's private B factors.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from torch import Tensor

from fedlora.aggregation import Adapter, LoraPair
from fedlora.engines.flower.messages import LOCAL_PREFIX, PHASE_UPLOAD, TrainDownload, TrainReply, TrainTask
from fedlora.models.lora_state import PEFT_PREFIX, adapter_to_state_dict, state_dict_to_adapter
from fedlora.protocol.rounds import BaseMerge


# -- the two typed messages ------------------------------------------------------------------
def download_content(download: TrainDownload) -> RecordDict:
    """A :class:`TrainDownload` as a TRAIN message's content."""
    content = RecordDict({"arrays": round_record(download.arrays), "config": download.task.to_config()})
    stacked = {r: m.stacked for r, m in download.merges.items() if m.stacked is not None}
    dense = {r: m.delta for r, m in download.merges.items() if m.stacked is None}
    if stacked:  # FLoRA sends its merges as the stacked factors, U r (d + k) floats instead of d k
        content["base-factors"] = stacked_record(stacked)
    if dense:
        content["base-delta"] = deltas_record(dense)
    return content


def read_download(content: RecordDict) -> TrainDownload:
    """Inverse of :func:`download_content` on the client: the task checked key by key, merges in round order
    (stacked factors multiplied out, as the server multiplied them)."""
    task = TrainTask.from_config(content["config"])
    merges = {r: BaseMerge(delta=d, stacked=None) for r, d in record_to_deltas(content["base-delta"]).items()} \
        if "base-delta" in content else {}
    if "base-factors" in content:
        merges |= {r: BaseMerge(delta=d, stacked=None) for r, d in record_to_stacked_deltas(content["base-factors"]).items()}
    return TrainDownload(task, _tensors(content["arrays"]), dict(sorted(merges.items())))


def reply_content(reply: TrainReply) -> RecordDict:
    """A :class:`TrainReply` as a TRAIN reply's content."""
    content = RecordDict({"arrays": round_record(reply.arrays), "metrics": MetricRecord(reply_metrics(reply))})
    if reply.eval_B is not None:
        content["eval-B"] = round_record(reply.eval_B)
    if reply.phase_upload is not None:
        content[PHASE_UPLOAD] = round_record(reply.phase_upload)
    return content


def reply_metrics(reply: TrainReply) -> dict[str, int | float]:
    """The reply's counts and losses as its ``metrics`` record holds them (a secure round's ``FitRes`` metrics too)."""
    metrics: dict[str, int | float] = {"num-examples": reply.num_examples, "partition-id": reply.partition_id,
                                       "train-loss": reply.loss, "base-version": reply.base_version}
    return metrics | {f"{LOCAL_PREFIX}{k}": float(v) for k, v in (reply.local_metrics or {}).items()}


def model_tensors(adapter: Adapter, head: dict[str, Tensor], *, A: bool = True, B: bool = True) -> dict[str, Tensor]:
    """Adapter + head under PEFT state-dict names, only the factors asked for: a message's ``arrays``."""
    state = {k: v for k, v in adapter_to_state_dict(adapter).items() if _factor_wanted(k, A=A, B=B)}
    return state | {f"{PEFT_PREFIX}{k}": v for k, v in head.items()}


def round_record(tensors: dict[str, Tensor]) -> ArrayRecord:
    return ArrayRecord.from_torch_state_dict({k: v.detach().to(torch.float32).contiguous() for k, v in tensors.items()})


def _tensors(record: ArrayRecord) -> dict[str, Tensor]:
    # clone: from_numpy shares the (read-only) message buffer
    return {k: torch.from_numpy(a.numpy()).clone() for k, a in record.items()}


def model_record(adapter: Adapter, head: dict[str, Tensor], *, A: bool = True, B: bool = True) -> ArrayRecord:
    """Adapter + head as one ArrayRecord keyed by PEFT state-dict names; ``A``/``B``: which factors to include."""
    return round_record(model_tensors(adapter, head, A=A, B=B))


def select_factors(record: ArrayRecord, *, A: bool = True, B: bool = True) -> ArrayRecord:
    """``record`` without the LoRA factors not asked for; the kept Arrays are shared, not re-serialised."""
    return ArrayRecord({k: a for k, a in record.items() if _factor_wanted(k, A=A, B=B)})


def _factor_wanted(key: str, *, A: bool, B: bool) -> bool:
    if ".lora_A." in key:
        return A
    if ".lora_B." in key:
        return B
    return True  # not a LoRA factor: the head always travels


def record_to_model(record: ArrayRecord, missing_from: Adapter | None = None) -> tuple[Adapter, dict[str, Tensor]]:
    """Inverse of :func:`model_record`: ``(adapter, head)``.

    ``missing_from``: where the factors that did not travel come from (the receiver's own copy:
    FFA-LoRA's frozen A, FedSA-LoRA's local B); without it every module needs both A and B.
    """
    return tensors_to_model(_tensors(record), missing_from)


def tensors_to_model(state: dict[str, Tensor], missing_from: Adapter | None = None) -> tuple[Adapter, dict[str, Tensor]]:
    """:func:`record_to_model` for already decoded tensors (``fedlora.engines.flower.replies`` validates them first)."""
    head = {k[len(PEFT_PREFIX):]: v for k, v in state.items() if ".lora_" not in k}
    if missing_from is not None:
        state = adapter_to_state_dict(missing_from) | state  # the received factors win
    adapter = state_dict_to_adapter(state, strict=False)
    return adapter, head


def deltas_record(deltas: dict[int, dict[str, Tensor]]) -> ArrayRecord:
    """``{round: {module: (d, k)}}`` → ``"<round>/<module>"`` keys."""
    return round_record({f"{r}/{m}": d for r, per_module in deltas.items() for m, d in per_module.items()})


def record_to_deltas(record: ArrayRecord) -> dict[int, dict[str, Tensor]]:
    """Inverse of :func:`deltas_record`, rounds in ascending order."""
    out: dict[int, dict[str, Tensor]] = {}
    for key, tensor in _tensors(record).items():
        r, _, module = key.partition("/")
        out.setdefault(int(r), {})[module] = tensor
    return dict(sorted(out.items()))


def stacked_record(stacked: dict[int, dict[str, LoraPair]]) -> ArrayRecord:
    """``{round: {module: LoraPair(A_stack, B_stack)}}`` → ``"<round>/<module>/A"`` and ``.../B`` keys."""
    return round_record({f"{r}/{m}/{name}": getattr(pair, name) for r, per_module in stacked.items()
                         for m, pair in per_module.items() for name in ("A", "B")})


def record_to_stacked_deltas(record: ArrayRecord) -> dict[int, dict[str, Tensor]]:
    """Inverse of :func:`stacked_record`, multiplied out: ``{round: {module: B_stack @ A_stack}}`` (d, k)."""
    factors: dict[tuple[int, str], dict[str, Tensor]] = {}
    for key, tensor in _tensors(record).items():
        r, module_and_factor = key.split("/", 1)
        module, _, name = module_and_factor.rpartition("/")
        factors.setdefault((int(r), module), {})[name] = tensor
    out: dict[int, dict[str, Tensor]] = {}
    for (r, module), pair in sorted(factors.items()):
        if set(pair) != {"A", "B"}:
            raise ValueError(f"base-factors for round {r} module {module!r} has {sorted(pair)}; expected A and B")
        # float64 like the server's product, then float32 like its base_delta
        out.setdefault(r, {})[module] = (pair["B"].double() @ pair["A"].double()).float()  # (d, U r) @ (U r, k)
    return out


def tensors_record(tensors: dict[str, Tensor]) -> ArrayRecord:
    return round_record(tensors)


def record_tensors(record: ArrayRecord) -> dict[str, Tensor]:
    return _tensors(record)


# -- bytes on the wire ------------------------------------------------------------------------
PHASE_RECORDS = ("phase", PHASE_UPLOAD)  # a phased method's broadcast and uploads
@dataclass(frozen=True)
class WireBytes:
    """Array payload bytes in messages, by what they carry (float32 data; no .npy headers).

    ``lora``: LoRA factors and ``base-delta`` records -- what
    :func:`fedlora.aggregation.communication.round_bytes` counts. ``head``: the classifier head.
    ``eval``: FedSA-LoRA's ``"eval-B"``, outside the protocol (see the module docstring).
    ``phase``: a phased method's broadcasts and uploads (FedASK's Q and sketches; :mod:`fedlora.engines.flower.phases`).
    ``serialized``: every Array's full serialised buffer (.npy header included).
    """

    lora: int = 0
    head: int = 0
    eval: int = 0
    phase: int = 0
    serialized: int = 0

    def __add__(self, other: "WireBytes") -> "WireBytes":
        return WireBytes(**{k: v + getattr(other, k) for k, v in asdict(self).items()})

    def as_record(self, direction: str) -> dict[str, int]:
        """``{"wire_<kind>_bytes_<direction>": n}`` for ``metrics.jsonl``."""
        return {f"wire_{k}_bytes_{direction}": v for k, v in asdict(self).items()}


def npy_header(data: bytes) -> tuple[tuple[int, int], tuple[int, ...], bool, np.dtype, int]:
    """``(version, shape, fortran_order, dtype, data offset)`` of a ``.npy`` buffer, read by numpy's own header
    readers without loading the array (raises whatever numpy raises on a malformed header)."""
    buffer = io.BytesIO(data)
    version = np.lib.format.read_magic(buffer)
    # version 1.0 has a 2-byte header length, 2.0 and 3.0 a 4-byte one; reading it ends at the data
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(buffer)
    return version, shape, fortran, dtype, buffer.tell()


def payload_bytes(array: Array) -> int:
    """Bytes of tensor data in a serialised Array: its ``.npy`` buffer minus the ``.npy`` header."""
    return len(array.data) - npy_header(array.data)[4]


def content_bytes(content: RecordDict) -> WireBytes:
    """What the ArrayRecords of one message's content weigh (ConfigRecords and MetricRecords are not counted)."""
    total = WireBytes()
    for name, record in content.array_records.items():
        for key, array in record.items():
            n = payload_bytes(array)
            if name == "eval-B":
                kind = "eval"
            elif name in PHASE_RECORDS:
                kind = "phase"
            elif name in ("base-delta", "base-factors") or ".lora_" in key:
                kind = "lora"
            else:
                kind = "head"
            total += WireBytes(**{kind: n}, serialized=len(array.data))
    return total
