"""Counting host syncs: the calls after which the host waits for the device to drain its queue.

Four kinds, each a stall of the launch queue on a GPU:

    item            aten._local_scalar_dense (``.item()``, ``int()`` / ``float()`` / ``bool()`` of a
                    tensor, ``if tensor:``) and aten.equal, of a device tensor.
    to_host         a device-to-host copy: ``.cpu()``, ``.to("cpu")``, ``.tolist()``, ``.numpy()``
                    (aten._to_copy / copy_ with a host destination and a device source).
    to_device       a blocking host-to-device copy, which PyTorch ends with a stream synchronize:
                    ``.to(device)`` without ``non_blocking=True``, ``torch.tensor(data, device=...)``
                    / ``torch.as_tensor(data, device=...)`` of Python or numpy data, and indexing
                    (or index_put) a device tensor with host index tensors.
    data_dependent  ops whose output size depends on the values, which the device must report
                    before the output can be allocated: nonzero / argwhere / ``torch.where(cond)``,
                    indexing or index_put with a boolean mask, masked_select, unique,
                    repeat_interleave without output_size.

Issue 12 names the first two (``_local_scalar_dense`` and device-to-host copies); the other two
stall a GPU just the same and are counted beside them.

``HostSyncCounter`` counts them with a TorchDispatchMode (plus wrappers of the few Python-level
calls that never reach the dispatcher on the CPU), per phase (``counter.phase("forward")``) and per
call site (the innermost frames of this repository's code on the Python stack).

On a machine with a GPU it reads the real devices (``emulate=False``). On a CPU-only machine
(``emulate=True``) nothing is a device, so the counter keeps track of where each tensor WOULD live
on a GPU, by the rule the code itself follows there: a tensor is on the device unless it is a
host tensor, which is

- the result of a factory call without a ``device`` argument or with the string ``"cpu"``:
  ``torch.tensor(data)``, ``torch.as_tensor(array)``, ``torch.zeros(n, device="cpu")``,
  ``torch.from_numpy(a)`` ... (with a ``torch.device``, e.g. ``device=x.device``, the result is a
  device tensor),
- the result of ``.cpu()``, ``.to("cpu")`` or ``.to(host_tensor)`` of any tensor,
- the result of an op whose tensor inputs are all host tensors.

Parameters, buffers, the batch and everything computed from them are device tensors, and so is
any tensor that existed before the counting began: run the warm-up under a counter too and pass it
as ``residency_from`` to the counters that count, so that what the warm-up made on the host (an
optimizer's step counters, say) is known as such. One approximation: on the CPU ``x.to(some_tensor.device)`` cannot be told from
``x.to(torch.device("cpu"))``, so a ``torch.device`` always means the device (what model code means
by it) and only the string ``"cpu"`` (or a host tensor as ``.to()``'s target) means the host.
A move that changes where a tensor lives returns an alias (``view_as``) on the CPU, so the
source keeps its own status. Where an op's CPU kernel syncs and its CUDA kernel does not, the
emulation follows CUDA: ``F.one_hot(labels, num_classes)`` checks the label range with two
``.item()`` on the CPU and in the kernel on a GPU, so those two are not counted.
"""
import collections
import contextlib
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("item", "to_host", "to_device", "data_dependent")

_aten = torch.ops.aten
_ITEM_OPS = {_aten._local_scalar_dense, _aten.equal}
_DATA_DEPENDENT_OPS = {_aten.nonzero, _aten.argwhere, _aten.masked_select, _aten._unique, _aten._unique2,
                       _aten.unique_dim, _aten.unique_consecutive, _aten.unique_dim_consecutive}
_INDEX_OPS = {_aten.index, _aten.index_put, _aten.index_put_, _aten._index_put_impl_}
# torch.<name> factories: without a device argument their result is a host tensor.
_FACTORIES = ("tensor", "as_tensor", "from_numpy", "zeros", "ones", "empty", "full", "arange", "linspace",
              "rand", "randn", "randint", "randperm", "eye", "scalar_tensor")
_FROM_DATA = ("tensor", "as_tensor")  # these copy Python / numpy data to the device they are given
_THIS_FILE = os.path.abspath(__file__)
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_INHERITED = object()


def _is_cpu(device):
    return device is not None and torch.device(device).type == "cpu"


def _means_host(device):
    """Emulation: whether a factory's ``device`` argument puts its result on the host."""
    return device is None or (isinstance(device, str) and _is_cpu(device))


class HostSyncCounter(TorchDispatchMode):
    """Context manager counting host syncs (see the module docstring).

    ``emulate``: True on a CPU-only machine (where each tensor would live on a GPU, by the rule
    above), False to read the real devices; None picks True when CUDA is unavailable.
    ``residency_from``: an earlier counter whose record of host tensors this one continues.
    ``events``: list of (phase, kind, site) in call order; ``counts()`` / ``sites()`` summarise them.
    ``depth``: frames of this repository's code kept per site (innermost first).
    """

    def __init__(self, emulate=None, depth=2, residency_from=None):
        super().__init__()
        self.emulate = emulate
        self.depth = depth
        self.events = []
        self._phase = "-"
        # Emulation: the tensors that would live on the host.
        self._host = residency_from._host if residency_from is not None else WeakIdKeyDictionary()
        self._patches = []
        self._inside_factory = False
        self._inside_cpu_only_check = 0

    # ------------------------------------------------------------- public API

    @contextlib.contextmanager
    def phase(self, name):
        previous, self._phase = self._phase, name
        try:
            yield
        finally:
            self._phase = previous

    def counts(self, phase=None):
        """{kind: count} over every phase, or over one."""
        result = dict.fromkeys(KINDS, 0)
        for event_phase, kind, _ in self.events:
            if phase is None or event_phase == phase:
                result[kind] += 1
        return result

    def sites(self):
        """[(count, phase, kind, site)], most frequent first."""
        tally = collections.Counter(self.events)
        return sorted(((n, phase, kind, site) for (phase, kind, site), n in tally.items()),
                      key=lambda row: (-row[0], row[1], row[2], row[3]))

    def on_device(self, tensor):
        """Whether ``tensor`` lives (or, emulating, would live) on the device."""
        if not self.emulate:
            return tensor.device.type != "cpu"
        return tensor.device.type != "meta" and tensor not in self._host

    # ----------------------------------------------------------- the counting

    def _record(self, kind):
        self.events.append((self._phase, kind, self._call_site()))

    def _call_site(self):
        """'path:line function' of the innermost ``depth`` frames of this repository's code (else
        of the innermost frame outside torch), innermost first."""
        frames, outside = [], None
        frame = sys._getframe(2)
        while frame is not None and len(frames) < self.depth:
            path = os.path.abspath(frame.f_code.co_filename)
            name = getattr(frame.f_code, "co_qualname", frame.f_code.co_name)
            if path.startswith(ROOT + os.sep) and path != _THIS_FILE:
                frames.append(f"{os.path.relpath(path, ROOT)}:{frame.f_lineno} {name}")
            elif outside is None and path != _THIS_FILE and not path.startswith(_TORCH_DIR):
                outside = f"{path}:{frame.f_lineno} {name}"
            frame = frame.f_back
        return " <- ".join(frames) or outside or "(no Python frame outside torch)"

    def _kind_of(self, func, args, kwargs):
        """The kind of sync that this dispatched call is, or None."""
        packet = func.overloadpacket
        source = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if source is None or (self._inside_factory and packet in (_aten._to_copy, _aten.copy_)):
            return None  # a factory's own copy of its data is counted by the factory's wrapper
        if packet in _ITEM_OPS:
            return "item" if self.on_device(source) else None
        if packet in _DATA_DEPENDENT_OPS:
            return "data_dependent" if self.on_device(source) else None
        if packet is _aten.repeat_interleave:
            if func is _aten.repeat_interleave.self_int or kwargs.get("output_size") is not None:
                return None
            return "data_dependent" if self.on_device(source) else None
        if packet in _INDEX_OPS and self.on_device(source):
            indices = [index for index in (args[1] if len(args) > 1 else ()) if isinstance(index, torch.Tensor)]
            if any(index.dtype in (torch.bool, torch.uint8) for index in indices):
                return "data_dependent"
            if any(index.dim() > 0 and not self.on_device(index) for index in indices):
                return "to_device"
            return None
        if packet is _aten._to_copy and not self.emulate:
            # Emulating, ``.to()`` is judged by the Python-level wrapper (a CPU-to-CPU .to() of a
            # tensor does not reach the dispatcher at all).
            target = kwargs.get("device")
            if target is None or torch.device(target).type == source.device.type:
                return None
            if _is_cpu(target):
                return "to_host"
            return "to_device" if source.device.type == "cpu" and not kwargs.get("non_blocking") else None
        if packet is _aten.copy_ and len(args) > 1 and isinstance(args[1], torch.Tensor):
            destination_on_device, source_on_device = self.on_device(args[0]), self.on_device(args[1])
            if source_on_device and not destination_on_device:
                return "to_host"
            if destination_on_device and not source_on_device and args[1].dim() > 0 and not (
                    args[2] if len(args) > 2 else kwargs.get("non_blocking", False)):
                return "to_device"
        return None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = self._kind_of(func, args, kwargs)
        if kind is not None and not (kind == "item" and self._inside_cpu_only_check):
            self._record(kind)
        output = func(*args, **kwargs)
        if self.emulate:
            # Host in, host out; a factory (no tensor input) makes a device tensor unless the
            # Python-level factory wrapper says it had no device argument.
            inputs = [leaf for leaf in tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)]
            if inputs and all(tensor in self._host for tensor in inputs):
                for leaf in tree_leaves(output):
                    if isinstance(leaf, torch.Tensor):
                        self._host[leaf] = True
        return output

    # -------------------------------------------------- Python-level wrappers

    def __enter__(self):
        if self.emulate is None:
            self.emulate = not torch.cuda.is_available()
        self._patch_factories()
        if self.emulate:
            self._patch_methods()
            self._patch_cpu_only_checks()
        try:
            return super().__enter__()
        except BaseException:
            self._unpatch()
            raise

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._unpatch()

    def _patch(self, owner, name, replacement):
        # An attribute that the owner inherits (torch.Tensor's methods live on its C base) is
        # deleted again on exit rather than copied onto the owner.
        self._patches.append((owner, name, owner.__dict__.get(name, _INHERITED)))
        setattr(owner, name, replacement)

    def _unpatch(self):
        while self._patches:
            owner, name, original = self._patches.pop()
            if original is _INHERITED:
                delattr(owner, name)
            else:
                setattr(owner, name, original)

    def _mark(self, tensor, host):
        if isinstance(tensor, torch.Tensor):
            if host:
                self._host[tensor] = True
            elif tensor in self._host:
                del self._host[tensor]
        return tensor

    def _moved(self, tensor, result, host):
        """``result`` of moving ``tensor`` to the host (or device); an alias where the CPU gave back
        the tensor itself and its status would change."""
        if result is tensor and (tensor in self._host) != host:
            result = tensor.view_as(tensor)
        return self._mark(result, host)

    def _patch_factories(self):
        counter = self

        def factory(name):
            wrapped = getattr(torch, name)

            def make(*args, **kwargs):
                device = kwargs.get("device")
                data_is_tensor = name in _FROM_DATA and bool(args) and isinstance(args[0], torch.Tensor)
                on_host = _means_host(device) if counter.emulate else (device is None or _is_cpu(device))
                if name in _FROM_DATA and not data_is_tensor and not on_host:
                    counter._record("to_device")  # Python / numpy data copied to the device
                counter._inside_factory, previous = True, counter._inside_factory
                try:
                    result = wrapped(*args, **kwargs)
                finally:
                    counter._inside_factory = previous
                if counter.emulate:
                    if data_is_tensor and device is None:
                        counter._mark(result, host=args[0] in counter._host)
                    else:
                        counter._mark(result, host=name == "from_numpy" or on_host)
                return result
            return make

        for name in _FACTORIES:
            self._patch(torch, name, factory(name))

    def _patch_cpu_only_checks(self):
        counter = self
        one_hot = torch.nn.functional.one_hot

        def checked_in_the_kernel_on_a_gpu(tensor, num_classes=-1):
            if num_classes < 0:  # the class count comes from max().item() on a GPU too
                return one_hot(tensor, num_classes)
            counter._inside_cpu_only_check += 1
            try:
                return one_hot(tensor, num_classes)
            finally:
                counter._inside_cpu_only_check -= 1

        self._patch(torch.nn.functional, "one_hot", checked_in_the_kernel_on_a_gpu)

    def _patch_methods(self):
        counter = self
        original = {name: getattr(torch.Tensor, name) for name in ("cpu", "numpy", "tolist", "to")}

        def cpu(self, *args, **kwargs):
            if counter.on_device(self):
                counter._record("to_host")
            return counter._moved(self, original["cpu"](self, *args, **kwargs), host=True)

        def numpy(self, *args, **kwargs):
            if counter.on_device(self):
                counter._record("to_host")
            return original["numpy"](self, *args, **kwargs)

        def tolist(self):
            if counter.on_device(self):
                counter._record("to_host")
            return original["tolist"](self)

        def to(self, *args, **kwargs):
            target = kwargs.get("device")
            if target is None:
                target = next((arg for arg in args if isinstance(arg, (str, torch.device, torch.Tensor))), None)
            result = original["to"](self, *args, **kwargs)
            if target is None:  # a dtype change: the dispatcher saw it, residency follows
                return result
            if isinstance(target, torch.Tensor):
                to_host = target in counter._host
            else:
                to_host = isinstance(target, str) and _is_cpu(target)
            if to_host and counter.on_device(self):
                counter._record("to_host")
            elif not to_host and not counter.on_device(self) and not kwargs.get("non_blocking"):
                counter._record("to_device")
            return counter._moved(self, result, host=to_host)

        for name, function in (("cpu", cpu), ("numpy", numpy), ("tolist", tolist), ("to", to)):
            self._patch(torch.Tensor, name, function)


def format_sites(counter, limit=None, indent="  "):
    """Lines 'N x kind [phase] site', most frequent first."""
    rows = counter.sites()
    lines = [f"{indent}{n:>4} x {kind:<14} [{phase}] {site}" for n, phase, kind, site in rows[:limit]]
    if limit is not None and len(rows) > limit:
        lines.append(f"{indent}... {len(rows) - limit} more sites")
    return lines
