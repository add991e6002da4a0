"""``broker serve --workers N``: a supervisor process and N worker processes on one port.

Each worker is a whole broker (HTTP API, background refresher), forked by the supervisor after
the settings are loaded: all start from the same settings, a replacement too (a fresh process
would read a configuration file that may have changed since; for SIGHUP, see below).
They share the work through Redis exactly as replicas do (locks, leases, rate limits); the
embedded ``memory://`` store, which a process cannot share, is refused by the settings.

Sockets: the supervisor binds, the workers listen. It first checks with an ordinary bind that
the port is free, so a port in use (even by another broker's workers) is one error, as with one
process. Then each worker gets a socket of its own bound with ``SO_REUSEPORT``: the kernel
spreads new connections over the workers' accept queues, keep-alive clients' connections
included (on one shared socket the worker that wakes first may take them all), and a worker
gets connections only once it listens, that is once it can serve. A worker that dies takes its
socket with it: new connections go to the others until its replacement listens.

Metrics: prometheus-client's multiprocess mode (:mod:`broker.metrics`), in a fresh directory
the supervisor makes and removes. A worker's files are named by its number rather than its pid,
so a replacement carries on its predecessor's counters and the directory does not grow with
restarts; a dead worker's live gauges are dropped.

Signals: SIGTERM and SIGINT are forwarded to every worker, which drains within
``shutdown_timeout``; one still running ``KILL_MARGIN`` seconds later is killed. SIGHUP is
forwarded (each worker reloads its clients); a worker started after a SIGHUP gets one as soon
as it serves, so it reloads too. Workers run in a process group of their own, so a terminal's
Ctrl-C reaches only the supervisor, which forwards it once, and (on Linux) get SIGTERM if the
supervisor dies.

A worker that exits while not asked to is started again after a backoff (``RESTART_FIRST``
doubling up to ``RESTART_MAX``; back to the first once a worker has served for
``STABLE_AFTER``). A worker that fails ``START_ATTEMPTS`` times in a row before it serves makes
the supervisor stop the others and exit 1.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import selectors
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

import structlog
from prometheus_client import multiprocess, values

from broker.config import Settings
from broker.metrics import MULTIPROCESS_DIR
from broker.worker_sockets import Address, bind, free_addresses

log = structlog.get_logger("broker.workers")

RESTART_FIRST = 0.5
RESTART_MAX = 30.0
STABLE_AFTER = 60.0
START_ATTEMPTS = 5
# After shutdown_timeout: a worker's last write of a rotated token (redis_timeout) and its
# exit; below the 5 s the Helm chart adds to the pod's grace period.
KILL_MARGIN = 4.0
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
PR_SET_PDEATHSIG = 1

WorkerMain = Callable[[list[socket.socket], int, Callable[[], None]], None]
"""Runs one worker until it is told to stop: given its bound sockets (it listens on them), its
number, and a call to make once it can serve."""


@dataclass
class _Slot:
    number: int
    pid: int = 0
    ready_fd: int = -1  # read end of a pipe the worker writes to once it serves
    ready: bool = False
    started: float = 0.0
    failures: int = 0  # unexpected exits in a row (the backoff)
    start_failures: int = 0  # exits before serving, in a row
    restart_at: float | None = None


def supervise(settings: Settings, main: WorkerMain) -> int:
    """Run ``settings.workers`` workers until SIGTERM/SIGINT; the exit status."""
    directory = tempfile.mkdtemp(prefix="broker-metrics-")
    os.environ[MULTIPROCESS_DIR] = directory  # inherited by every worker
    try:
        return _Supervisor(settings, main, directory).run()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class _Supervisor:
    def __init__(self, settings: Settings, main: WorkerMain, metrics_dir: str) -> None:
        self._settings = settings
        self._main = main
        self._metrics_dir = metrics_dir
        self._slots = [_Slot(number) for number in range(settings.workers)]
        self._selector = selectors.DefaultSelector()
        self._addresses: list[Address] = []
        self._stopping = False
        self._kill_at = 0.0
        self._killed = False
        self._reloaded = False  # a SIGHUP arrived: workers started later must reload too
        self._status = 0
        self._pid = os.getpid()
        self._wakeup = (-1, -1)

    def run(self) -> int:
        wakeup = self._wakeup = os.pipe()
        for fd in wakeup:
            os.set_blocking(fd, False)
        previous = {sig: signal.signal(sig, _ignore) for sig in SIGNALS}
        signal.set_wakeup_fd(wakeup[1], warn_on_full_buffer=False)  # one byte per signal
        self._selector.register(wakeup[0], selectors.EVENT_READ)
        try:
            s = self._settings
            try:
                self._addresses = free_addresses(s.host, s.port)
            except OSError as err:
                log.error("workers.cannot_listen", host=s.host, port=s.port, error=str(err))
                return 1
            port = self._addresses[0][1][1]
            log.info(
                "workers.starting",
                workers=s.workers,
                host=s.host,
                port=port,
                metrics_dir=self._metrics_dir,
            )
            for slot in self._slots:
                self._start(slot)
            return self._loop()
        finally:
            signal.set_wakeup_fd(-1)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._selector.close()
            for fd in wakeup:
                os.close(fd)

    def _loop(self) -> int:
        while True:
            for key, _ in self._selector.select(self._timeout()):
                if key.data is None:
                    self._on_signals(_read(key.fd))
                else:
                    self._on_ready(key.data)
            self._reap()
            now = time.monotonic()
            if self._stopping:
                if not any(slot.pid for slot in self._slots):
                    log.info("workers.stopped", status=self._status)
                    return self._status
                if now >= self._kill_at and not self._killed:
                    self._killed, self._status = True, 1
                    log.error("workers.killed", detail="still running after shutdown_timeout")
                    self._signal_all(signal.SIGKILL)
                continue
            for slot in self._slots:
                if slot.restart_at is not None and now >= slot.restart_at:
                    self._start(slot)

    def _timeout(self) -> float | None:
        if self._stopping:
            return None if self._killed else max(0.0, self._kill_at - time.monotonic())
        due = [slot.restart_at for slot in self._slots if slot.restart_at is not None]
        return max(0.0, min(due) - time.monotonic()) if due else None

    def _on_signals(self, numbers: bytes) -> None:
        for number in numbers:
            if number in (signal.SIGTERM, signal.SIGINT):
                self._stop(signal.Signals(number))
            elif number == signal.SIGHUP and not self._stopping:
                self._reloaded = True
                for slot in self._slots:
                    if slot.ready:
                        _kill(slot.pid, signal.SIGHUP)

    def _stop(self, sig: signal.Signals) -> None:
        """Forward ``sig`` (a second one too: as for one process, it cuts the drain short)."""
        if not self._stopping:
            self._stopping = True
            self._kill_at = time.monotonic() + self._settings.shutdown_timeout + KILL_MARGIN
            for slot in self._slots:
                slot.restart_at = None
            log.info("workers.stopping", signal=sig.name)
        self._signal_all(sig)

    def _signal_all(self, sig: signal.Signals) -> None:
        for slot in self._slots:
            if slot.pid:
                _kill(slot.pid, sig)

    def _start(self, slot: _Slot) -> None:
        slot.restart_at = None
        try:
            sockets = bind(self._addresses)
        except OSError as err:  # another process took the port meanwhile
            log.error("worker.cannot_listen", worker=slot.number, error=str(err))
            self._failed(slot, ready=False)
            return
        ready_read, ready_write = os.pipe()
        pid = os.fork()
        if pid == 0:
            self._selector.close()  # the child's copy; the supervisor's registrations stay
            inherited = [ready_read, *self._wakeup, *(other.ready_fd for other in self._slots)]
            _worker(self._main, slot.number, sockets, ready_write, inherited, self._pid)
        os.close(ready_write)
        for sock in sockets:
            sock.close()  # the worker's now: it goes when the worker does
        slot.pid, slot.ready_fd, slot.ready = pid, ready_read, False
        slot.started = time.monotonic()
        self._selector.register(ready_read, selectors.EVENT_READ, slot)
        log.info("worker.started", worker=slot.number, pid=pid)

    def _on_ready(self, slot: _Slot) -> None:
        signalled = _read(slot.ready_fd)
        self._close_ready(slot)
        if not signalled:
            return  # it exited before serving: _reap sees it
        slot.ready, slot.start_failures = True, 0
        log.info("worker.ready", worker=slot.number, pid=slot.pid)
        if self._reloaded:
            _kill(slot.pid, signal.SIGHUP)

    def _close_ready(self, slot: _Slot) -> None:
        if slot.ready_fd >= 0:
            self._selector.unregister(slot.ready_fd)
            os.close(slot.ready_fd)
            slot.ready_fd = -1

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = next((slot for slot in self._slots if slot.pid == pid), None)
            if slot is not None:  # else an orphan handed to us as a container's pid 1
                self._exited(slot, os.waitstatus_to_exitcode(status))

    def _exited(self, slot: _Slot, code: int) -> None:
        multiprocess.mark_process_dead(_metrics_id(slot.number), self._metrics_dir)  # type: ignore[no-untyped-call]
        self._close_ready(slot)
        pid, ready, uptime = slot.pid, slot.ready, time.monotonic() - slot.started
        slot.pid, slot.ready = 0, False
        if self._stopping:
            log.info("worker.stopped", worker=slot.number, pid=pid, exit_code=code)
            return
        log.error(
            "worker.exited",
            worker=slot.number,
            pid=pid,
            exit_code=code,  # negative: the signal that killed it
            served=ready,
            uptime_s=round(uptime, 1),
        )
        if ready and uptime >= STABLE_AFTER:
            slot.failures = 0
        self._failed(slot, ready=ready)

    def _failed(self, slot: _Slot, *, ready: bool) -> None:
        slot.failures += 1
        slot.start_failures = 0 if ready else slot.start_failures + 1
        if slot.start_failures >= START_ATTEMPTS:
            log.error(
                "workers.giving_up",
                worker=slot.number,
                detail=f"a worker failed {START_ATTEMPTS} times in a row before serving",
            )
            self._status = 1
            self._stop(signal.SIGTERM)
            return
        delay = min(RESTART_FIRST * 2 ** (slot.failures - 1), RESTART_MAX)
        slot.restart_at = time.monotonic() + delay
        log.warning("worker.restarting", worker=slot.number, delay_s=delay)


def _worker(
    main: WorkerMain,
    number: int,
    sockets: list[socket.socket],
    ready_fd: int,
    inherited: list[int],
    parent: int,
) -> NoReturn:
    """The forked worker: never returns into the supervisor's code. ``inherited``: the
    supervisor's descriptors, closed here."""
    status = 1
    try:
        os.setpgid(0, 0)
        _die_with(parent)
        signal.set_wakeup_fd(-1)
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the app handles it
        for fd in inherited:
            if fd >= 0:
                os.close(fd)
        _count_metrics_as(number)

        def ready() -> None:
            os.write(ready_fd, b".")
            os.close(ready_fd)

        main(sockets, number, ready)
        status = 0
    except SystemExit as exit_:
        if isinstance(exit_.code, str):
            print(exit_.code, file=sys.stderr)
        status = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(status)


def _ignore(signum: int, frame: object) -> None:
    """Signals are read from the wake-up pipe; a handler must exist for it to be written."""


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 512)
    except BlockingIOError:
        return b""


def _kill(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _die_with(parent: int) -> None:
    """Linux: SIGTERM this worker when the supervisor dies, even by SIGKILL."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _metrics_id(number: int) -> str:
    return f"worker{number}"


def _count_metrics_as(number: int) -> None:
    """Name this process's metric files by its worker number, not its pid. (prometheus-client
    picks the class of its values when first imported, from the environment; metrics read it
    when they are made, in the worker's app.)"""
    values.ValueClass = values.MultiProcessValue(lambda: _metrics_id(number))  # type: ignore[no-untyped-call]
