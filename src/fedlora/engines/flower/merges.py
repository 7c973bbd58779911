"""Which frozen-weight merges each SuperNode still lacks, with bounded memory and bounded resends.

Methods that merge into the frozen weights (FedEx-LoRA's residual, FLoRA's stacked product) make
one dense (d, k) change per module per round; every SuperNode holds its own frozen weights and
must replay the merges it missed. Two things must not grow with the run:

* **Memory.** The server keeps the last :data:`MAX_KEPT_MERGES` merges one by one (the
  ``window``) plus one running ``total`` of every merge so far (product space, float32): at most
  ``MAX_KEPT_MERGES + 1`` dense sets, whatever the number of rounds. :meth:`MergeLedger.absorb`
  moves each new merge out of :attr:`fedlora.protocol.rounds.Server.merges` after the round.
* **Resends.** What a node holds is the server's ledger (:attr:`MergeLedger.version`: the newest
  merge sent to it in a message it answered), not what the node says: its reported
  ``base-version`` is clamped to [ledger, newest merge], so a node that always reports 0 is still
  sent each merge once. A node whose missing merges are all in the window gets them one by one
  (at most ``MAX_KEPT_MERGES``: bit-identical to the local engine); a new node, or one so far
  behind that its merges were folded into ``total``, gets ``total`` alone with ``base-reset``: it
  restores its pristine frozen weights and merges that one delta (one dense set per round, equal
  to the replayed merges up to float32 rounding -- what a resumed run sends new nodes too).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedlora.protocol.rounds import BaseMerge

MAX_KEPT_MERGES = 4  # merges kept one by one; older ones live only in the running total


@dataclass(frozen=True)
class Download:
    """The merges one TRAIN message carries and the version the node holds once it has merged them."""

    merges: dict[int, BaseMerge]
    reset: bool  # restore the pristine frozen weights first (``merges`` is then the one running total)
    version: int


@dataclass
class MergeLedger:
    keep: int = MAX_KEPT_MERGES
    window: dict[int, BaseMerge] = field(default_factory=dict)  # round -> merge, the newest `keep`
    total: dict[str, Tensor] | None = None  # {module: (d, k)}: the sum of every merge so far
    latest: int = 0  # round of the newest merge (0: none yet)
    folded: int = 0  # newest round whose merge is only in `total`
    version: dict[int, int] = field(default_factory=dict)  # node id -> newest merge it holds

    def __post_init__(self) -> None:
        if self.keep < 1:
            raise ValueError(f"keep={self.keep} is invalid: at least the newest merge must be kept")

    def absorb(self, merges: dict[int, BaseMerge] | None) -> None:
        """Take the server's new merges (emptying its dict) into the window and the running total."""
        if not merges:
            return
        for round_ in sorted(merges):
            merge = merges.pop(round_)
            delta = {m: d.to(torch.float32) for m, d in merge.delta.items()}  # (d, k)
            self.total = delta if self.total is None else {m: self.total[m] + d for m, d in delta.items()}
            self.window[round_] = merge
            self.latest = max(self.latest, round_)
        while len(self.window) > self.keep:
            oldest = min(self.window)
            del self.window[oldest]
            self.folded = max(self.folded, oldest)

    def download(self, node: int) -> Download:
        """What ``node`` must be sent: the merges newer than its ledger version."""
        have = self.version.get(node, 0)
        if have >= self.latest:
            return Download({}, reset=False, version=have)
        if have >= self.folded:  # every missing merge is still kept one by one
            return Download({r: m for r, m in sorted(self.window.items()) if r > have}, reset=False, version=self.latest)
        assert self.total is not None  # latest > 0: some merge was absorbed
        return Download({self.latest: BaseMerge(delta=self.total, stacked=None)}, reset=True, version=self.latest)

    def acknowledge(self, node: int, sent: Download, reported: int) -> int:
        """The node answered the message that carried ``sent``: it holds ``reported`` clamped to
        [what it was sent, the newest merge]; returns the version recorded."""
        version = min(max(reported, sent.version), self.latest)
        self.version[node] = version
        return version

    def forget(self, node: int) -> None:
        """A node replaced by another for its partition: a later node with this id starts from scratch."""
        self.version.pop(node, None)
