"""The supervisor's decisions, driven deterministically: a fake clock, a fake process table, fake status files.

No processes: `PoolCore.tick()` is run turn by turn and what it spawns and signals is checked.
"""

import signal

import pytest

from transcribe.core.pool.supervisor import (
    MAX_BOOT_FAILURES,
    STABLE_AFTER,
    PoolCore,
    PoolParams,
    backoff,
)
from transcribe.core.pool.worker_process import EXIT_BOOT_FAILED, EXIT_OK


class FakeProc:
    def __init__(self, pid):
        self.pid, self.exitcode = pid, None

    def is_alive(self):
        return self.exitcode is None


class World:
    """The clock, the process table and the workers/ folder, as the core sees them."""

    def __init__(self, n=2, **params):
        self.now = 1000.0
        self.next_pid = 100
        self.procs: dict[int, FakeProc] = {}
        self.by_worker: dict[str, FakeProc] = {}
        self.signals: list[tuple[int, int]] = []
        self.status: dict[str, tuple[dict, float]] = {}
        p = PoolParams(heartbeat_timeout=10, boot_timeout=60, shutdown_timeout=30, graceful_timeout=100,
                       respawn_backoff_max=8)
        for k, v in params.items():
            setattr(p, k, v)
        self.core = PoolCore([None] * n, p, spawn=self.spawn, send=self.send, read_status=self.read_status,
                             clock=lambda: self.now)

    # the injected world
    def spawn(self, slot):
        self.next_pid += 1
        proc = FakeProc(self.next_pid)
        self.procs[proc.pid] = self.by_worker[slot.worker_id] = proc
        return proc

    def send(self, pid, sig):
        self.signals.append((pid, sig))
        if sig == signal.SIGKILL:
            self.procs[pid].exitcode = -9

    def read_status(self, worker_id):
        return self.status.get(worker_id, ({}, None))

    # what workers do
    def beat(self, worker_id, state="ready", mtime=None):
        pid = self.by_worker[worker_id].pid
        old = self.status.get(worker_id, ({}, 0.0))[1] or 0.0
        self.status[worker_id] = ({"pid": pid, "state": state}, old + 1 if mtime is None else mtime)

    def exit(self, worker_id, code):
        self.by_worker[worker_id].exitcode = code

    def advance(self, seconds, step=0.25, beating=()):
        end = self.now + seconds
        while self.now < end:
            self.now += step
            for w in beating:
                self.beat(w, "busy")
            self.core.tick()

    def pids(self):
        return {s.worker_id: (s.proc.pid if s.proc else None) for s in self.core.slots}

    def respawn_delay(self, worker_id):
        """Kill the worker; how long until the core spawns its replacement."""
        self.exit(worker_id, -9)
        died = self.now
        self.core.tick()
        while self.pids()[worker_id] is None:
            self.now += 0.25
            self.core.tick()
        return self.now - died

    def signalled(self, worker_id, sig):
        return (self.by_worker[worker_id].pid, sig) in self.signals


def booted(n=2, **params):
    w = World(n, **params)
    w.core.start()
    for s in w.core.slots:
        w.beat(s.worker_id)
    w.core.tick()
    assert all(s.proc.ready for s in w.core.slots)
    return w


def test_heartbeat_age_is_measured_from_when_the_mtime_last_changed():
    w = booted()
    # mtimes far in the past by the wall clock (an NTP step) but changing: alive
    w.status["w1"] = ({"pid": w.by_worker["w1"].pid, "state": "busy"}, 5.0)
    for i in range(100):
        w.now += 1
        w.beat("w1", "busy", mtime=5.0 + i)
        w.beat("w2", "ready")
        w.core.tick()
    assert w.signals == []
    # w1's file stops changing: after heartbeat_timeout on the monotonic clock, SIGTERM, then SIGKILL
    hung = w.by_worker["w1"].pid
    w.advance(9, beating=["w2"])
    assert w.signals == []
    w.advance(2, beating=["w2"])
    assert w.signals == [(hung, signal.SIGTERM)]
    w.advance(6, beating=["w2"])
    assert (hung, signal.SIGKILL) in w.signals and w.pids()["w1"] != hung
    assert w.core.uncounted_pids == set()  # a hung job is the job's fault: its attempt counts


def test_crash_after_ready_respawns_with_exponential_backoff():
    w = booted()
    delays = []
    for _ in range(6):
        pid = w.pids()["w1"]
        delays.append(w.respawn_delay("w1"))
        assert w.pids()["w1"] != pid
        w.beat("w1")
        w.core.tick()
    assert delays == pytest.approx([backoff(i, 8) for i in range(1, 7)], abs=0.26)
    assert delays[-1] == pytest.approx(8, abs=0.26)  # capped at respawn_backoff_max
    assert w.core.slots[0].restarts == 6 and not w.core.fatal
    # a worker that ran stably resets the backoff
    w.advance(STABLE_AFTER + 1, beating=["w1", "w2"])
    assert w.respawn_delay("w1") == pytest.approx(0.5, abs=0.26)


def test_boot_failure_at_start_stops_the_pool_without_respawning():
    w = World(2)
    w.core.start()
    w.status["w1"] = ({"pid": w.by_worker["w1"].pid, "state": "boot_failed",
                       "error": {"message": "init_param does not exist"}}, 1.0)
    w.core.tick()
    w.exit("w1", EXIT_BOOT_FAILED)
    w.core.tick()
    assert w.core.fatal and "could not boot" in w.core.fatal and "init_param" in w.core.fatal
    assert len(w.procs) == 2  # no respawn


def test_a_respawns_boot_failure_stops_the_pool_only_if_it_persists():
    w = booted()
    w.exit("w1", -9)  # a healthy worker dies; its respawn fails to boot, twice (a transient cause)
    for _ in range(MAX_BOOT_FAILURES - 1):
        w.advance(10, beating=["w2"])
        w.exit("w1", EXIT_BOOT_FAILED)
        w.core.tick()
        assert not w.core.fatal
    assert not w.signalled("w2", signal.SIGTERM)  # the healthy worker is left alone
    w.advance(10, beating=["w2"])
    w.beat("w1")  # the cause went away: it boots
    w.advance(1, beating=["w2"])
    assert w.core.slots[0].boot_failures == 0
    for _ in range(MAX_BOOT_FAILURES + 1):  # a persistent failure does stop it
        w.exit("w1", -9 if w.core.slots[0].proc.ready else EXIT_BOOT_FAILED)
        w.advance(10, beating=["w2"])
        if w.core.fatal:
            break
    assert w.core.fatal and "before becoming ready" in w.core.fatal


def test_reload_starts_new_workers_first_then_drains_old_ones():
    w = booted(2)
    old = dict(w.pids())
    w.core.reload([None, None], w.core.params)
    w.core.tick()
    # one new worker boots at a time; no old one is signalled before a new one is ready
    assert sorted(w.pids()) == ["w3", "w4"] and sum(p is not None for p in w.pids().values()) == 1
    assert w.signals == []
    w.beat("w3")
    w.core.tick()
    assert [sig for _, sig in w.signals] == [signal.SIGTERM]  # one old worker drains
    retired = next(pid for pid, _ in w.signals)
    w.core.tick()
    assert w.pids()["w4"] is not None
    w.beat("w4")
    w.core.tick()
    assert {pid for pid, _ in w.signals} == set(old.values())
    for pid in old.values():
        w.procs[pid].exitcode = EXIT_OK  # finished their jobs and left
    w.core.tick()
    assert w.core.legacy == [] and w.core.uncounted_pids == set() and retired in old.values()


def test_a_draining_worker_past_graceful_timeout_is_killed_and_its_job_not_counted():
    w = booted(1, graceful_timeout=100)
    busy = w.by_worker["w1"].pid
    w.core.reload([None], w.core.params)
    w.core.tick()
    w.beat("w2")
    w.advance(99, beating=["w1", "w2"])
    assert (busy, signal.SIGTERM) in w.signals and (busy, signal.SIGKILL) not in w.signals
    w.advance(2, beating=["w1", "w2"])
    assert (busy, signal.SIGKILL) in w.signals and busy in w.core.uncounted_pids


def test_three_reloads_during_one_long_job_never_stop_it():
    w = booted(1, graceful_timeout=600)
    busy = w.by_worker["w1"].pid
    beating = ["w1"]
    for _ in range(3):
        w.core.reload([None], w.core.params)
        w.core.tick()
        new = w.core.slots[0].worker_id
        w.beat(new)
        beating.append(new)
        w.advance(5, beating=beating)
    assert (busy, signal.SIGKILL) not in w.signals and w.procs[busy].is_alive()
    w.procs[busy].exitcode = EXIT_OK  # the job finished, the old worker left
    w.advance(1, beating=beating[1:])
    assert busy not in w.core.uncounted_pids and not w.core.fatal


def test_reload_changes_the_worker_count():
    w = booted(2)
    w.core.reload([None], w.core.params)
    w.core.tick()
    w.beat("w3")
    w.core.tick()
    assert len(w.core.slots) == 1 and len([s for s in w.signals if s[1] == signal.SIGTERM]) == 2


def test_reload_whose_workers_cannot_boot_keeps_the_old_ones():
    w = booted(2)
    old = dict(w.pids())
    w.core.reload([None, None], w.core.params)
    w.core.tick()
    w.exit("w3", EXIT_BOOT_FAILED)
    w.core.tick()
    assert not w.core.fatal and w.core.reverted and "could not boot" in w.core.reverted
    assert w.pids() == old and w.signals == []
    w.advance(5, beating=["w1", "w2"])
    assert w.pids() == old and not w.core.fatal


def test_shutdown_terms_then_kills_and_such_jobs_are_not_counted():
    w = booted(2, shutdown_timeout=30)
    w.core.begin_shutdown()
    assert sorted(sig for _, sig in w.signals) == [signal.SIGTERM, signal.SIGTERM]
    w.exit("w2", EXIT_OK)
    w.advance(31, beating=["w1"])
    assert w.signalled("w1", signal.SIGKILL) and w.core.uncounted_pids == {w.by_worker["w1"].pid}
    assert w.core.finished and len(w.procs) == 2  # nothing respawned while stopping
