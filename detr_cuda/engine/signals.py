"""SIGTERM/SIGINT: ask the training loop to stop after the current step.

The first signal sets a flag that the loop checks after each optimizer step
(it then writes a checkpoint and exits 0); a second SIGINT interrupts at once.

DataLoader workers ignore both signals (``shield_loader_workers``) so that a
group-wide signal cannot kill them before the main process has written its
checkpoint; in exchange the main process must stop them itself on every way
out (``shutdown_loader_workers``), including an uncaught exception: otherwise
multiprocessing's exit handler SIGTERMs them (ignored) and joins them forever.
"""
import atexit
import multiprocessing.util  # noqa: F401  (its exit handler must be registered before ours)
import signal
import weakref


class StopRequest:
    def __init__(self):
        self.signal_name = None
        self._previous = {}

    @property
    def requested(self):
        return self.signal_name is not None

    def install(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (e.g. inside some test runners): nothing to install
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        print(f"{self.signal_name} received: finishing the current step (or evaluation), then writing a checkpoint "
              "(press Ctrl-C again to abort without one)", flush=True)

    def uninstall(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


class WorkerSignalShield:
    """DataLoader ``worker_init_fn`` wrapper: workers ignore SIGTERM/SIGINT.

    Ctrl-C, Slurm and ``kill -TERM -<pgid>`` signal the whole process group; a
    worker dying of it would crash the main process ("DataLoader worker is
    killed by signal") before it can write its checkpoint. The main process
    shuts its workers down itself when it exits: install the shield with
    ``shield_loader_workers``, which guarantees that.
    """

    def __init__(self, inner=None):
        self.inner = inner

    def __call__(self, worker_id):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if self.inner is not None:
            self.inner(worker_id)


# Loaders whose workers ignore SIGTERM; stopped at interpreter exit if nobody did it before.
_SHIELDED_LOADERS = weakref.WeakSet()
_EXIT_HANDLER_REGISTERED = False
# Seconds to wait for a worker to leave after the orderly shutdown and after SIGKILL.
_WORKER_JOIN_TIMEOUT_S = 5.0


def shield_loader_workers(loader):
    """Makes ``loader``'s workers ignore SIGTERM/SIGINT and registers it for shutdown at exit.

    The exit handler is registered after multiprocessing's and torch's DataLoader
    handlers, so it runs before them (atexit is last-in, first-out): the workers
    are gone before multiprocessing would SIGTERM and join them.
    """
    global _EXIT_HANDLER_REGISTERED
    loader.worker_init_fn = WorkerSignalShield(loader.worker_init_fn)
    _SHIELDED_LOADERS.add(loader)
    if not _EXIT_HANDLER_REGISTERED:
        atexit.register(_shutdown_shielded_loaders)
        _EXIT_HANDLER_REGISTERED = True
    return loader


def shutdown_loader_workers(loader):
    """Stops the worker processes of ``loader``'s (persistent) iterator and waits for them.

    The orderly DataLoader shutdown first; a worker still alive after it (it
    ignores the SIGTERM that shutdown falls back to) is killed. A no-op for
    loaders without workers or that never started iterating; the loader starts
    fresh workers if it is iterated again.
    """
    iterator = getattr(loader, "_iterator", None)
    if iterator is None:
        return
    loader._iterator = None
    shutdown = getattr(iterator, "_shutdown_workers", None)
    try:
        if shutdown is not None:
            shutdown()
    finally:
        for worker in getattr(iterator, "_workers", ()):
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=_WORKER_JOIN_TIMEOUT_S)


def _shutdown_shielded_loaders():
    for loader in list(_SHIELDED_LOADERS):
        try:
            shutdown_loader_workers(loader)
        except Exception as error:  # keep going: the other loaders' workers must go too
            print(f"WARNING: could not stop DataLoader workers: {error}", flush=True)
