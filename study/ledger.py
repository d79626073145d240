"""The trial ledger: the one record of where every trial of a study stands.

Each trial (a fine-tune trial or a zero-shot evaluation) has a folder
`<study>/results/trials/<trial_id>/` and in it `trial.json`, its ledger entry, replaced atomically
and durably (`foundation.files`: temp file, fsync, rename) on every change of state. Everything
else that shows a trial's state is a view of these entries: `results/trials.csv` and the
end-of-study summary (`study.stages.collect_results`), and the MLflow run statuses (the driver
sets a run's status from its trial's entry, `RUN_STATUS`).

The states (`TrialStatus`) and who writes them:

    PENDING        planned, not started yet                          the driver, before the search
    RUNNING        a worker is at it (attempt `attempts`)            the worker, when it starts
    CRASHED        its worker died or raised; Ray Tune retries it,   the driver (Tune's recover event)
                   from its last epoch checkpoint
    TERMINATED     done: every epoch trained (or a zero-shot          the worker, after writing its
                   evaluation run) and tested                        outputs
    STOPPED_EARLY  the scheduler (ASHA) stopped it; its best epoch   the worker that finalises it
                   so far was tested
    ERROR          failed, with `reason`: a non-finite loss, a       the worker, or the driver when
                   user error, or a worker that failed every attempt  the retries are used up

TERMINATED, STOPPED_EARLY and ERROR are final (`TrialEntry.final`): whoever meets a final entry
returns it instead of computing again, which is how a resumed study never re-runs finished work.
The exception is an ERROR caused by a user error (a file changed under the study): the next run,
after the fix, starts it again.
A trial the scheduler stopped whose test evaluation has not run yet stays RUNNING with
`stop_after` set (the epochs it trained): whoever runs it next evaluates its best epoch on test
and trains no more, also after the driver was killed in between.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from enum import StrEnum
from pathlib import Path

from foundation.files import write_atomic

ENTRY_FILE = "trial.json"


class TrialStatus(StrEnum):
    """A trial's state; the values are what results/trials.csv and MLflow's status tag show."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    CRASHED = "CRASHED"
    TERMINATED = "TERMINATED"
    STOPPED_EARLY = "STOPPED_EARLY"
    ERROR = "ERROR"


FINAL = frozenset({TrialStatus.TERMINATED, TrialStatus.STOPPED_EARLY, TrialStatus.ERROR})
#: The MLflow run status that shows a trial's state (a trial still RUNNING when the study ends is KILLED).
RUN_STATUS = {TrialStatus.TERMINATED: "FINISHED", TrialStatus.STOPPED_EARLY: "FINISHED",
              TrialStatus.ERROR: "FAILED"}


@dataclass(frozen=True)
class TrialEntry:
    """One trial's ledger entry, as `trial.json` holds it."""

    trial_id: str
    stage: str  # finetune | zero_shot | unet
    status: TrialStatus
    params: dict
    reason: str | None = None  # why it failed (ERROR) or crashed (CRASHED)
    user_error: bool = False  # the reason is a mistake in the input (a study.errors UserError): stop the study
    summary: dict = field(default_factory=dict)  # the final metrics, once tested
    node: str | None = None  # the Ray node of its latest attempt
    pid: int | None = None  # the worker process of its latest attempt
    attempts: int = 0  # how many times a worker started it
    stop_after: int | None = None  # the scheduler stopped it after this many epochs
    started: float | None = None  # when its latest attempt started (Unix time)
    ended: float | None = None
    updated: float | None = None

    @property
    def final(self) -> bool:
        return self.status in FINAL

    @property
    def to_run(self) -> bool:
        """Whether a (resumed) study runs this trial: it is not final, or it failed on a user error
        (the input may have been fixed since)."""
        return not self.final or self.user_error

    def to_dict(self) -> dict:
        return {**asdict(self), "status": str(self.status)}

    @classmethod
    def from_dict(cls, data: dict) -> TrialEntry:
        known = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in data.items() if k in known}, "status": TrialStatus(data["status"])})


class TrialLedger:
    """The entries of one study's trials, under `<study_dir>/results/trials/`.

    Every method re-reads the entry from disk: the file is the state, nothing is cached in
    memory, so the driver and the workers (other processes, other machines on a shared file
    system) always agree.
    """

    def __init__(self, study_dir: str | Path):
        self.root = Path(study_dir) / "results" / "trials"

    def folder(self, trial_id: str) -> Path:
        return self.root / trial_id

    def read(self, trial_id: str) -> TrialEntry | None:
        """The entry of `trial_id`, or None when it has none (or an unreadable one)."""
        path = self.folder(trial_id) / ENTRY_FILE
        try:
            return TrialEntry.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            return None  # writes are atomic, so only a hand-edited file gets here: treat it as new

    def write(self, entry: TrialEntry) -> TrialEntry:
        entry = replace(entry, updated=time.time())
        write_atomic(self.folder(entry.trial_id) / ENTRY_FILE, json.dumps(entry.to_dict(), indent=1, default=str))
        return entry

    def entries(self) -> list[TrialEntry]:
        """Every entry of the study, by trial id."""
        found = (self.read(path.name) for path in sorted(self.root.glob("*")) if path.is_dir())
        return [entry for entry in found if entry is not None]

    # --- the transitions -------------------------------------------------------------------

    def plan(self, trial_id: str, stage: str, params: dict) -> TrialEntry:
        """PENDING, unless the trial has an entry already (a resumed study keeps what it has)."""
        return self.read(trial_id) or self.write(TrialEntry(trial_id, stage, TrialStatus.PENDING, params))

    def start(self, trial_id: str, stage: str, params: dict, node: str | None) -> TrialEntry:
        """A worker starts (or resumes) the trial: RUNNING, one more attempt. A final entry is returned
        as it is, unless it failed on a user error (`TrialEntry.to_run`)."""
        entry = self.read(trial_id) or TrialEntry(trial_id, stage, TrialStatus.PENDING, params)
        if not entry.to_run:
            return entry
        return self.write(replace(entry, status=TrialStatus.RUNNING, node=node, pid=os.getpid(),
                                  attempts=entry.attempts + 1, started=time.time(), user_error=False))

    def finish(self, trial_id: str, status: TrialStatus, summary: dict) -> TrialEntry:
        """TERMINATED or STOPPED_EARLY with the trial's final metrics (its outputs are written already)."""
        return self.write(replace(self._existing(trial_id), status=status, summary=summary, reason=None,
                                  ended=time.time()))

    def fail(self, trial_id: str, reason: str, *, user_error: bool = False, stage: str = "finetune",
             params: dict | None = None) -> TrialEntry:
        """ERROR with `reason` (also for a trial that has no entry yet: its worker never started)."""
        entry = self.read(trial_id) or TrialEntry(trial_id, stage, TrialStatus.PENDING, params or {})
        return self.write(replace(entry, status=TrialStatus.ERROR, reason=reason, user_error=user_error,
                                  ended=time.time()))

    def crashed(self, trial_id: str, reason: str) -> TrialEntry | None:
        """CRASHED: the latest attempt failed and Ray Tune retries it. A final entry stays as it is."""
        entry = self.read(trial_id)
        if entry is None or entry.final:
            return entry
        return self.write(replace(entry, status=TrialStatus.CRASHED, reason=reason))

    def stopped(self, trial_id: str, epochs: int) -> TrialEntry:
        """The scheduler stopped the trial after `epochs` epochs: it is only to be tested now."""
        entry = self._existing(trial_id)
        if entry.final:
            return entry
        return self.write(replace(entry, stop_after=epochs))

    def _existing(self, trial_id: str) -> TrialEntry:
        entry = self.read(trial_id)
        if entry is None:
            raise KeyError(f"trial {trial_id} has no ledger entry in {self.root}")
        return entry
