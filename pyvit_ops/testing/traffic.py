"""Global-memory traffic meters, since without a GPU we cannot time kernels.

- ``count_triton_traffic``: bytes every ``tl.load`` / ``tl.store`` (and atomic) of the
  Triton kernels moves while they run in the interpreter, counting only the elements
  whose mask is true.
- ``count_aten_traffic``: bytes the aten ops of a PyTorch composition read (tensor
  inputs) and write (tensor outputs), for comparison with the fused kernels.
- ``compulsory_bytes``: every input read once, every output written once.

All figures are models of DRAM traffic, not measurements: caches are not simulated.
The Triton meter reports both every access (``read_bytes``: no cache at all) and the
distinct addresses touched (``unique_read_bytes``: a perfect cache), which bracket
the DRAM traffic of the kernel on a real GPU.
"""
import contextlib

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def tensor_bytes(t):
    """Bytes of the distinct memory a tensor addresses (broadcast dims count once)."""
    if t.numel() == 0:
        return 0
    if t.layout != torch.strided:
        return t.numel() * t.element_size()
    elements = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            elements *= size
    return elements * t.element_size()


def compulsory_bytes(inputs, outputs):
    """Minimum traffic of an operator: every input read once, every output written once.

    ``inputs`` / ``outputs``: a tensor or an iterable of tensors (None entries are
    skipped; the same tensor object passed twice counts once). Returns
    ``dict(read_bytes, write_bytes, total_bytes)``.
    """
    read = sum(tensor_bytes(t) for t in _unique_tensors(inputs, "inputs"))
    write = sum(tensor_bytes(t) for t in _unique_tensors(outputs, "outputs"))
    return {"read_bytes": read, "write_bytes": write, "total_bytes": read + write}


def _unique_tensors(value, name):
    items = [value] if isinstance(value, torch.Tensor) else list(value)
    seen, result = set(), []
    for item in items:
        if item is None:
            continue
        if not isinstance(item, torch.Tensor):
            raise TypeError(f"{name} must be tensors (or None), got {type(item).__name__}")
        if id(item) not in seen:
            seen.add(id(item))
            result.append(item)
    return result


# --------------------------------------------------------------------------- Triton


class _TritonMeter:
    """Accumulates the bytes of the interpreter's memory accesses, per kernel."""

    def __init__(self):
        self.by_kernel = {}
        self._kernel = None
        # addresses per (kernel, "read"/"write"): lists of (uint64 addresses, itemsize)
        self._addresses = {}

    def _entry(self):
        name = self._kernel or "<outside a kernel launch>"
        if name not in self.by_kernel:
            self.by_kernel[name] = {"launches": 0, "read_bytes": 0, "write_bytes": 0}
        return name, self.by_kernel[name]

    def launch(self, name):
        self._kernel = name
        self._entry()[1]["launches"] += 1

    def done(self):
        self._kernel = None

    @property
    def in_launch(self):
        return self._kernel is not None

    def access(self, kind, ptrs, mask):
        """Record the addresses of ``ptrs`` where ``mask`` (TensorHandle, array or None) holds."""
        itemsize = max(1, (ptrs.get_element_ty().primitive_bitwidth + 7) // 8)
        addresses = ptrs.data
        if mask is not None:
            # tensor-descriptor accesses pass the mask as a bare numpy array
            mask = mask if isinstance(mask, np.ndarray) else mask.data
            # A scalar condition may reach the interpreter broadcast as an integer array:
            # as an index it would pick elements 0 and 1, not the true lanes.
            addresses = addresses[np.broadcast_to(mask.astype(bool, copy=False), addresses.shape)]
        name, entry = self._entry()
        entry[f"{kind}_bytes"] += addresses.size * itemsize
        self._addresses.setdefault((name, kind), []).append((addresses.ravel().copy(), itemsize))

    def unique_bytes(self, kind, kernel=None):
        chunks = [c for (name, k), cs in self._addresses.items()
                  if k == kind and kernel in (None, name) for c in cs]
        if not chunks:
            return 0
        addresses = np.concatenate([a for a, _ in chunks])
        sizes = np.concatenate([np.full(a.size, s, dtype=np.int64) for a, s in chunks])
        _, first = np.unique(addresses, return_index=True)
        return int(sizes[first].sum())

    def report(self):
        by_kernel = {}
        for name, entry in self.by_kernel.items():
            by_kernel[name] = dict(entry,
                                   unique_read_bytes=self.unique_bytes("read", name),
                                   unique_write_bytes=self.unique_bytes("write", name))
        read = sum(e["read_bytes"] for e in by_kernel.values())
        write = sum(e["write_bytes"] for e in by_kernel.values())
        return {"read_bytes": read, "write_bytes": write, "total_bytes": read + write,
                "unique_read_bytes": self.unique_bytes("read"),
                "unique_write_bytes": self.unique_bytes("write"),
                "launches": sum(e["launches"] for e in by_kernel.values()),
                "by_kernel": by_kernel}


@contextlib.contextmanager
def _patched(owner, name, make):
    original = getattr(owner, name)
    setattr(owner, name, make(original))
    try:
        yield
    finally:
        setattr(owner, name, original)


def count_triton_traffic(fn, *args, **kwargs):
    """Run ``fn(*args, **kwargs)`` and count the global-memory bytes its Triton kernels move.

    The kernels must run in the interpreter (``TRITON_INTERPRET=1`` set before they were
    defined, as tests/conftest.py does). Every element a ``tl.load`` / ``tl.store`` /
    atomic touches with a true mask is counted at its dtype size (atomics count as a
    read and a write). Returns ``(result, report)`` with report keys: read_bytes,
    write_bytes, total_bytes (every access, no cache), unique_read_bytes,
    unique_write_bytes (distinct addresses, a perfect cache), launches, and
    ``by_kernel[name]`` = {launches, read_bytes, write_bytes, unique_read_bytes,
    unique_write_bytes}.
    """
    with _triton_metering() as meter:
        result = fn(*args, **kwargs)
    return result, meter.report()


def count_fused_traffic(fn, *args, **kwargs):
    """``count_triton_traffic`` plus the aten ops that run around the kernels: the "glue"
    of a fused path (zero-filled buffers, dtype casts, sums of partial results,
    contiguous copies), including the ones inside pyvit_ops' custom ops, which a
    dispatch mode would otherwise see only as one opaque call. Ops the interpreter
    issues while a kernel runs (its host copies of the arguments) are not glue: the
    kernel's own loads and stores count instead. ``report["glue"]`` is a
    ``count_aten_traffic`` report of the glue ops.
    """
    with _triton_metering() as meter:
        aten = _AtenMeter(skip=lambda: meter.in_launch, open_namespaces=("pyvit_ops",))
        with aten:
            result = fn(*args, **kwargs)
    report = meter.report()
    report["glue"] = aten.report()
    return result, report


@contextlib.contextmanager
def _triton_metering():
    from pyvit_ops.testing import interpreter as _interp

    if not _interp.is_enabled():
        raise RuntimeError("the Triton traffic meters need the interpreter: set "
                           "TRITON_INTERPRET=1 (pyvit_ops.testing.interpreter.enable()) "
                           "before the kernels are defined")
    from triton.runtime import interpreter

    meter = _TritonMeter()
    builder = interpreter.InterpreterBuilder
    # create_load / create_store / descriptor loads and stores all go through the
    # masked variants, so wrapping these two sees every access exactly once.
    def masked_load(original):
        def create_masked_load(self, ptrs, mask, other, *rest, **kw):
            meter.access("read", ptrs, mask)
            return original(self, ptrs, mask, other, *rest, **kw)
        return create_masked_load

    def masked_store(original):
        def create_masked_store(self, ptrs, value, mask, *rest, **kw):
            meter.access("write", ptrs, mask)
            return original(self, ptrs, value, mask, *rest, **kw)
        return create_masked_store

    def atomic_rmw(original):
        def create_atomic_rmw(self, rmw_op, ptr, val, mask, *rest, **kw):
            meter.access("read", ptr, mask)
            meter.access("write", ptr, mask)
            return original(self, rmw_op, ptr, val, mask, *rest, **kw)
        return create_atomic_rmw

    def atomic_cas(original):
        def create_atomic_cas(self, ptr, *rest, **kw):
            meter.access("read", ptr, None)
            meter.access("write", ptr, None)
            return original(self, ptr, *rest, **kw)
        return create_atomic_cas

    def grid_call(original):
        def call(self, *a, **k):
            meter.launch(self.fn.__name__)
            try:
                return original(self, *a, **k)
            finally:
                meter.done()
        return call

    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(builder, "create_masked_load", masked_load))
        stack.enter_context(_patched(builder, "create_masked_store", masked_store))
        stack.enter_context(_patched(builder, "create_atomic_rmw", atomic_rmw))
        stack.enter_context(_patched(builder, "create_atomic_cas", atomic_cas))
        stack.enter_context(_patched(interpreter.GridExecutor, "__call__", grid_call))
        yield meter


# --------------------------------------------------------------------------- aten

# Ops that overwrite their destination without reading it.
_OVERWRITE_OPS = {torch.ops.aten.copy_, torch.ops.aten.fill_, torch.ops.aten.zero_}
# Allocations hand out memory without touching it.
_ALLOC_OPS = {torch.ops.aten.empty, torch.ops.aten.empty_like, torch.ops.aten.empty_strided,
              torch.ops.aten.new_empty, torch.ops.aten.new_empty_strided}


class _AtenMeter(TorchDispatchMode):
    """Counts every aten call but those made while ``skip()`` holds; a custom op of one of
    ``open_namespaces`` is not counted itself: its Python implementation runs under the
    meter, so the ops inside it are."""

    def __init__(self, skip=lambda: False, open_namespaces=()):
        super().__init__()
        self.ops = {}
        self._skip, self._open = skip, open_namespaces

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace in self._open:
            # Private API: the function a torch.library.custom_op was defined with.
            from torch._library.custom_ops import OPDEFS

            with self:
                return OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        if self._skip():
            return out
        read, written = _op_tensors(func, args, kwargs, out)
        entry = self.ops.setdefault(str(func), {"calls": 0, "read_bytes": 0, "write_bytes": 0})
        entry["calls"] += 1
        entry["read_bytes"] += sum(tensor_bytes(t) for t in read)
        entry["write_bytes"] += sum(tensor_bytes(t) for t in written)
        return out

    def report(self):
        read = sum(e["read_bytes"] for e in self.ops.values())
        write = sum(e["write_bytes"] for e in self.ops.values())
        return {"read_bytes": read, "write_bytes": write, "total_bytes": read + write,
                "ops": self.ops}


def _op_tensors(func, args, kwargs, out):
    """(tensors read, tensors written) by one aten call; views move nothing."""
    if func.overloadpacket in _ALLOC_OPS:
        return [], []
    schema = func._schema
    mutated, not_read = [], set()
    for i, arg in enumerate(schema.arguments):
        value = args[i] if i < len(args) and not arg.kwarg_only else kwargs.get(arg.name)
        if arg.alias_info is not None and arg.alias_info.is_write:
            tensors = [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]
            mutated += tensors
            if arg.kwarg_only or func.overloadpacket in _OVERWRITE_OPS:   # out= / copy_ / fill_
                not_read.update(id(t) for t in tensors)
    inputs = _dedup(t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor))
    outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    # An op that writes nothing and returns only tensors living in an input's storage
    # (view, reshape, expand, permute, _unsafe_view...) moves no memory.
    input_storages = {_storage(t) for t in inputs}
    if not mutated and outputs and all(_storage(t) in input_storages for t in outputs):
        return [], []
    read = [t for t in inputs if id(t) not in not_read]
    return read, _dedup(mutated + outputs)


def _storage(t):
    return t.untyped_storage().data_ptr(), t.device


def _dedup(tensors):
    seen, result = set(), []
    for t in tensors:
        key = (_storage(t), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key not in seen:
            seen.add(key)
            result.append(t)
    return result


def count_aten_traffic(fn, *args, **kwargs):
    """Run ``fn(*args, **kwargs)`` and add up the bytes its aten ops read and write.

    Each aten call (as seen by a TorchDispatchMode, i.e. after decomposition of
    composite ops and including autograd's backward ops if ``fn`` runs backward) reads
    its tensor inputs and writes its tensor outputs, each counted once per call at
    ``tensor_bytes`` (broadcast/stride-0 dims count once). Allocations (empty...) and
    view ops count 0 bytes: they move no memory. A view op is any op that mutates
    nothing and returns only tensors in an input's storage (view, reshape of a
    contiguous tensor, expand, permute, transpose, slicing, detach). In-place ops read
    and write their destination; ``out=`` arguments and the destination of
    copy_/fill_/zero_ are written, not read. Like an unfused GPU run, intermediates
    count every time they go through memory; caches are ignored.

    Returns ``(result, dict(read_bytes, write_bytes, total_bytes, ops))`` where
    ``ops[str(aten_overload)] = {calls, read_bytes, write_bytes}``.
    """
    meter = _AtenMeter()
    with meter:
        result = fn(*args, **kwargs)
    return result, meter.report()
