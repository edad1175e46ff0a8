"""SIGTERM/SIGINT: ask the training loop to stop after the current step.

The first signal sets a flag that the loop checks after each optimizer step
(it then writes a checkpoint and exits 0); a second SIGINT interrupts at once.
"""
import signal


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
        print(f"{self.signal_name} received: finishing the current step, then writing a checkpoint "
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
    shuts its workers down itself when it exits.
    """

    def __init__(self, inner=None):
        self.inner = inner

    def __call__(self, worker_id):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if self.inner is not None:
            self.inner(worker_id)
