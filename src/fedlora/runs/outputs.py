"""A run's folder, written by one owner: config.json, metrics.jsonl, trackers, generations, the adapter.

:class:`fedlora.protocol.rounds.Server` keeps the checkpoint (the source of truth for ``--resume``)
and tells a :class:`RunFolder` what happened; everything else under ``--out`` is written here:

- ``config.json`` when a fresh run starts (a resumed run keeps the one it has);
- ``metrics.jsonl`` rewritten from the checkpoint's history after every round (atomically), and the
  ``--log-to`` trackers fed the new records (rounds a resumed run already had were logged by the
  process that ran them);
- ``generations/round-NNN.jsonl``: what a generative task's model wrote for each test prompt;
- ``adapter/``: the final PEFT adapter with its model card, built aside and swapped in whole, so a
  crash never leaves half an adapter; then one plot per metric.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from peft import PeftModel

from fedlora.config.run import RunConfig
from fedlora.protocol.checkpoint import ServerState
from fedlora.util.atomic import atomic_write_text
from fedlora.runs.adapter_files import save_adapter
from fedlora.runs.run_dir import claim, refuse_existing


class RunFolder:
    """The files of one run in ``config.out`` (implements :class:`fedlora.protocol.rounds.RunOutputs`)."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.out = Path(config.out)
        self.trackers: list[Any] = []
        self.logged_rounds = 0
        self.resume = False

    def prepare(self, resume: bool) -> None:
        """Refuse what cannot be written before anything is loaded: a missing tracker package, a folder
        holding someone else's files (a run replaces a run, API and Flower alike, never anything else)."""
        self.resume = resume
        if self.config.log_to:
            from fedlora.runs.trackers import check_installed

            check_installed(self.config.log_to)
        self.out.mkdir(parents=True, exist_ok=True)
        if not resume:
            refuse_existing(self.out, overwrite=True)
            claim(self.out)

    def started(self, state: ServerState) -> None:
        if not self.resume:
            atomic_write_text(self.out / "config.json", self.config.to_json())
        self.logged_rounds = len(state.history)
        if self.config.log_to:
            from fedlora.runs.trackers import open_trackers  # a tracker's package only when asked for

            self.trackers = open_trackers(self.config.log_to, self.out, self.config.to_json())
        self._write_metrics(state)

    def round_done(self, state: ServerState, samples: list[dict[str, Any]]) -> None:
        if samples:  # what a generative task's model wrote, one JSON line per test prompt
            (self.out / "generations").mkdir(exist_ok=True)
            atomic_write_text(self.out / "generations" / f"round-{state.round:03d}.jsonl",
                              "".join(json.dumps(s) + "\n" for s in samples))
        self._write_metrics(state)

    def _write_metrics(self, state: ServerState) -> None:
        atomic_write_text(self.out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in state.history))
        if self.trackers and len(state.history) > self.logged_rounds:
            from fedlora.runs.trackers import log_records

            log_records(self.trackers, state.history[self.logged_rounds:])
        self.logged_rounds = len(state.history)

    def finished(self, model: PeftModel, state: ServerState) -> None:
        """The final global model as a PEFT adapter (built aside, swapped in whole), and the plots."""
        target = self.out / "adapter"
        scratch, old = target.with_name(target.name + ".tmp"), target.with_name(target.name + ".old")
        for leftover in (scratch, old):
            if leftover.exists():
                shutil.rmtree(leftover)
        save_adapter(model, scratch, given_model=self.config.model)
        from fedlora.runs.model_card import write_model_card

        meta = json.loads((scratch / "fedlora_base.json").read_text())
        write_model_card(scratch, self.config, state.history, meta["base_model"], meta["base_model_loaded_as"])
        if target.exists():
            target.rename(old)
        scratch.rename(target)
        if old.exists():
            shutil.rmtree(old)
        if state.history:
            from fedlora.reporting.curves import plot_run  # matplotlib only when a run finishes

            plot_run(self.out)
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []
