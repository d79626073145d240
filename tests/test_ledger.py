"""The trial ledger: its states, who may move a trial between them, and what is on disk."""

import json

import pytest

from study.ledger import ENTRY_FILE, RUN_STATUS, TrialLedger, TrialStatus


@pytest.fixture
def ledger(tmp_path):
    return TrialLedger(tmp_path)


def on_disk(ledger, name):
    return json.loads((ledger.folder(name) / ENTRY_FILE).read_text())


def test_a_trial_goes_pending_running_terminated_and_is_then_left_alone(ledger):
    ledger.plan("t1", "finetune", {"lr": 1e-4})
    assert on_disk(ledger, "t1")["status"] == "PENDING"
    running = ledger.start("t1", "finetune", {"lr": 1e-4}, node="n1")
    assert running.status == TrialStatus.RUNNING and running.attempts == 1 and running.node == "n1" and running.pid
    done = ledger.finish("t1", TrialStatus.TERMINATED, {"test_dice": 0.8})
    assert done.final and on_disk(ledger, "t1")["summary"] == {"test_dice": 0.8}
    mtime = (ledger.folder("t1") / ENTRY_FILE).stat().st_mtime_ns
    again = ledger.start("t1", "finetune", {"lr": 1e-4}, node="n2")  # a resumed study meets it
    assert again == done and (ledger.folder("t1") / ENTRY_FILE).stat().st_mtime_ns == mtime
    assert ledger.plan("t1", "finetune", {}) == done and ledger.crashed("t1", "late event") == done
    assert not list(ledger.folder("t1").glob(".*.tmp")), "no temp file is left behind"


def test_a_crash_is_recorded_and_the_next_attempt_counts(ledger):
    ledger.start("t2", "finetune", {}, node="n1")
    crashed = ledger.crashed("t2", "RayActorError: the actor died")
    assert crashed.status == TrialStatus.CRASHED and not crashed.final
    retry = ledger.start("t2", "finetune", {}, node="n2")
    assert retry.status == TrialStatus.RUNNING and retry.attempts == 2 and retry.node == "n2"


def test_a_trial_that_failed_after_its_retries_is_an_error_with_its_reason(ledger):
    failed = ledger.fail("never-started", "FileExistsError: [Errno 17]", params={"lr": 1}, stage="finetune")
    assert failed.status == TrialStatus.ERROR and failed.final and failed.reason.startswith("FileExistsError")
    assert RUN_STATUS[failed.status] == "FAILED"
    assert [e.trial_id for e in ledger.entries()] == ["never-started"]


def test_a_stopped_trial_waits_for_its_test_evaluation(ledger):
    ledger.start("t3", "finetune", {}, node=None)
    entry = ledger.stopped("t3", 2)
    assert entry.status == TrialStatus.RUNNING and entry.stop_after == 2 and not entry.final
    assert ledger.start("t3", "finetune", {}, node=None).stop_after == 2  # the next attempt only tests it
    assert ledger.finish("t3", TrialStatus.STOPPED_EARLY, {}).final


def test_an_unreadable_entry_reads_as_none_and_entries_skip_it(ledger):
    ledger.folder("bad").mkdir(parents=True)
    (ledger.folder("bad") / ENTRY_FILE).write_text("{not json")
    assert ledger.read("bad") is None and ledger.entries() == []


def test_a_trial_that_failed_on_a_user_error_runs_again_once_the_input_is_fixed(ledger):
    ledger.start("t4", "finetune", {}, node=None)
    failed = ledger.fail("t4", "The prepared slice x.npz is missing", user_error=True)
    assert failed.final and failed.to_run  # shown as ERROR, and the next run starts it again
    again = ledger.start("t4", "finetune", {}, node=None)
    assert again.status == TrialStatus.RUNNING and again.attempts == 2 and not again.user_error
    plain = ledger.fail("t4", "FileExistsError")
    assert plain.final and not plain.to_run
