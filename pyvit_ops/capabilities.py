"""What each operator's backends support, declared once as data.

Per (operator, backend) one ``Capability``: dtypes, forward / backward, size limits,
GPU architectures, float32 arithmetic and the conditions checked per call. Per
operator one ``Operator``: its public functions and the automatic order on CUDA tensors
with the reason for it. The backend reasons (``_reasons`` in ``pyvit_ops/ops/<op>.py``
and ``pyvit_ops._backend.common_reasons``) read the limits, dtypes and architectures
from here, ``python -m pyvit_ops.info`` prints them and the README's support matrix is
``support_matrix_markdown()``. The CUDA builds export their compiled limits as ops
(``export_name``), checked against these values when a build loads
(``pyvit_ops._ext.read_limits``); tests compare the Triton kernel modules' constants
with them.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from pyvit_ops import _build_config

BACKENDS = ("reference", "triton", "cuda")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REFERENCE_DTYPES = KERNEL_DTYPES + (torch.float64,)
INT32_MAX = 2**31 - 1

_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                torch.float64: "fp64"}


@dataclass(frozen=True)
class Limit:
    """The largest value of the size ``name`` a backend takes, and why.

    ``dtype``: the limit holds for inputs of that dtype only (None: every dtype).
    ``steps``: a limit that depends on the size ``key``, as ``((largest key, limit),
    ...)`` in ascending key order; ``value`` is unused then.
    """
    name: str
    what: str
    why: str
    value: int = 0
    dtype: Optional[torch.dtype] = None
    key: str = ""
    steps: Tuple[Tuple[int, int], ...] = ()

    def bound(self, key_value=None):
        """The limit, for a stepped limit the one of the first step holding ``key_value``
        (past the last step: the last step's)."""
        if not self.steps:
            return self.value
        for largest, limit in self.steps:
            if key_value <= largest:
                return limit
        return self.steps[-1][1]

    def describe(self):
        """The limit in words, for the support matrix and ``python -m pyvit_ops.info``."""
        if not self.steps:
            return f"{self.what} ≤ {_number(self.value)}"
        key = self.key.replace("_", " ")
        return f"{self.what} " + ", ".join(f"≤ {_number(limit)} for {key} ≤ {_number(largest)}"
                                           for largest, limit in self.steps)

    def as_dict(self):
        """JSON-ready form."""
        out = {"name": self.name, "what": self.what, "why": self.why}
        if self.steps:
            out.update(key=self.key, steps=[list(step) for step in self.steps])
        else:
            out["value"] = self.value
        if self.dtype is not None:
            out["dtype"] = str(self.dtype).removeprefix("torch.")
        return out


@dataclass(frozen=True)
class Capability:
    """What one backend of one operator supports.

    ``min_compute_capability``: the oldest GPU the backend runs on (None: the CUDA
    extension's built architectures decide, ``pyvit_ops._ext``). ``conditions``: what
    the backend's reasons check per call beyond the size limits, in words.
    ``features``: which of the operator's optional ``Operator.features`` it runs.
    """
    op: str
    backend: str
    dtypes: Tuple[torch.dtype, ...]
    float32: str
    architectures: str
    forward: bool = True
    backward: bool = True
    min_compute_capability: Optional[Tuple[int, int]] = None
    limits: Tuple[Limit, ...] = ()
    conditions: Tuple[str, ...] = ()
    features: Tuple[str, ...] = ()

    def limit(self, name):
        """The limit on the size ``name``, or None when the backend has none."""
        for limit in self.limits:
            if limit.name == name:
                return limit
        return None

    def as_dict(self):
        """JSON-ready form."""
        return {"dtypes": [str(d).removeprefix("torch.") for d in self.dtypes],
                "forward": self.forward, "backward": self.backward, "float32": self.float32,
                "architectures": self.architectures,
                "limits": [limit.as_dict() for limit in self.limits],
                "conditions": list(self.conditions), "features": list(self.features)}


@dataclass(frozen=True)
class Operator:
    """An operator: its public functions, what every backend shares (``semantics``), the
    automatic order of kernel backends on CUDA tensors and why, and its optional
    ``features`` (``((name, what), ...)``), each run by the backends that list it."""
    name: str
    functions: Tuple[str, ...]
    order: Tuple[str, ...]
    order_reason: str
    semantics: str = ""
    features: Tuple[Tuple[str, str], ...] = ()


# --------------------------------------------------------------------------- declarations

_IEEE = "IEEE float32 products"
_REFERENCE_FP32 = "torch's own (TF32 only where torch allows it)"
_TRITON_ARCHS = "sm_80+"


def _cuda_archs(archs):
    # A cubin for sm_XY runs on sm_XZ with Z >= Y (SASS only, no PTX).
    return ", ".join(f"sm_{a[:-1]}x" if a.endswith("0") else f"sm_{a} to sm_{a[:-1]}9"
                     for a in archs)


# What a default build ships; python -m pyvit_ops.info shows what the installed one was
# built for.
_CUDA_ARCHS = _cuda_archs(_build_config.ARCHS) + " (default build)"

OPERATORS = (
    Operator(
        "scaled_dot_product_attention",
        ("scaled_dot_product_attention", "scaled_dot_product_attention_qkvpacked"),
        ("triton", "cuda"),
        "the Triton kernels multiply on tensor cores in every dtype (`tl.dot` → HMMA / wgmma; "
        "float32 inputs as 3xTF32, close to float32 accuracy); the CUDA C++ kernels multiply "
        "float32 inputs with FMAs",
        features=(("rel_pos_table", "BEiT relative-position table (`rel_pos_table`)"),)),
    Operator(
        "window_attention", ("window_attention", "window_attention_qkvpacked"),
        ("triton", "cuda"),
        "the Triton kernels multiply on tensor cores (float32 inputs as 3xTF32, plain TF32 "
        "when torch allows TF32 matmuls), take windows up to 24x24 and run Swin V2's cosine "
        "attention; the CUDA kernel multiplies float32 inputs with FMAs and also takes the "
        "float32 head dims the Triton kernels decline",
        features=(("cosine", "Swin V2 cosine attention (`logit_scale`)"),
                  ("grid_partition", "MaxViT grid attention (`partition=\"grid\"`)"))),
    Operator(
        "elsa_attention", ("elsa_attention",), ("cuda", "triton"),
        "memory-bound aggregation: the CUDA kernels stage the softmax and the haloed "
        "channels in shared memory and read everything once, without Triton's launch "
        "overhead", semantics="stride 1, odd `kernel_size`"),
    Operator(
        "avg_pool2d", ("avg_pool2d", "poolformer_pool"), ("cuda", "triton"),
        "memory-bound: both read once and write once; the CUDA kernel has the cheaper "
        "indexing and no launch overhead",
        semantics="`count_include_pad=False`, no `ceil_mode`, padding ≤ kernel // 2"),
    Operator(
        "talking_heads_attention", ("talking_heads_attention",), ("triton",),
        "the only kernel backend: one program holds every head of a query block, the head "
        "mixes are reductions over the head axis in registers, the products run on tensor "
        "cores (float32 inputs as 3xTF32)",
        semantics="no attention dropout (timm's `attn_drop` runs on the reference)"),
)

OPERATOR_NAMES = tuple(o.name for o in OPERATORS)


def _reference(op):
    return Capability(op, "reference", REFERENCE_DTYPES, _REFERENCE_FP32, "any device",
                      features=tuple(name for name, _ in OPERATORS[OPERATOR_NAMES.index(op)].features))


def _triton(op, float32=_IEEE, limits=(), conditions=(), features=()):
    return Capability(op, "triton", KERNEL_DTYPES, float32, _TRITON_ARCHS,
                      min_compute_capability=(8, 0), limits=limits, conditions=conditions,
                      features=features)


def _cuda(op, limits=(), conditions=(), features=()):
    return Capability(op, "cuda", KERNEL_DTYPES, _IEEE, _CUDA_ARCHS, limits=limits,
                      conditions=conditions, features=features)


CAPABILITIES = {(c.op, c.backend): c for c in (
    _reference("scaled_dot_product_attention"),
    _triton("scaled_dot_product_attention", "3xTF32 tensor-core products",
            limits=(Limit("head_dim", "head dim", "the Triton kernels hold the head dim, padded "
                          "to a power of two, in registers", 128),),
            conditions=("head-dim strides × (head dim − 1) < 2³¹",),
            features=("rel_pos_table",)),
    _cuda("scaled_dot_product_attention",
          features=("rel_pos_table",),
          limits=(Limit("head_dim", "head dim", "the CUDA kernels are compiled for head dims "
                        "padded to 32, 64 and 128", 128),
                  Limit("batch_tokens", "batch × tokens", "the CUDA kernels index their grid "
                        "in 32 bits", INT32_MAX))),
    _reference("window_attention"),
    _triton("window_attention",
            "3xTF32 tensor-core products; plain TF32 when torch allows TF32 matmuls",
            limits=(Limit("window_area", "window area (wh × ww)", "the Triton kernels are "
                          "built and checked for windows up to 24x24", 576),
                    Limit("head_dim", "head dim", "the Triton kernel keeps a window's q, k, v "
                          "tiles in registers", 128),
                    # fp32 tiles are twice the size (D = 128 spills), and past 32 tokens
                    # the 3xTF32 tiles spill at D = 64 too.
                    Limit("float32_head_dim", "float32 head dim", "the Triton kernel's fp32 "
                          "tiles would spill registers", dtype=torch.float32,
                          key="window_area", steps=((32, 64), (576, 32)))),
            conditions=("offsets inside one image < 2³¹",),
            features=("cosine", "grid_partition")),
    _cuda("window_attention",
          limits=(Limit("window_area", "window area (wh × ww)", "the CUDA kernels sweep a "
                        "window in 64-token tiles (online-softmax forward, three-sweep "
                        "backward above 64 tokens), built for windows up to 24x24", 576),),
          features=("cosine", "grid_partition")),
    _reference("elsa_attention"),
    _triton("elsa_attention",
            limits=(Limit("head_channels", "channels per head", "a Triton program holds one "
                          "head's channels in registers", 128),),
            conditions=("offsets inside one sample < 2³¹",)),
    _cuda("elsa_attention",
          limits=(Limit("kernel_size", "`kernel_size`", "the CUDA kernels are compiled for "
                        "each odd kernel size up to the limit (they unroll a row's taps)", 13),),
          conditions=("offsets inside one sample < 2³¹",
                      "its plan fits the device's shared memory per block and the grid")),
    _reference("avg_pool2d"),
    _triton("avg_pool2d", conditions=("one sample < 2³¹ elements",)),
    _cuda("avg_pool2d",
          limits=(Limit("image", "images and elements per image (input and output)",
                        "the CUDA kernels index them in 32 bits", INT32_MAX),)),
    _reference("talking_heads_attention"),
    _triton("talking_heads_attention", "3xTF32 tensor-core products",
            limits=(Limit("heads", "heads", "a Triton program holds every head's tiles in "
                          "registers (at 16 heads the dk kernel spills on sm_80)", 8),
                    Limit("float32_heads", "float32 heads", "a Triton program's fp32 tiles of "
                          "every head would not fit its registers and shared memory (8 heads "
                          "take 160 KB)", 4, dtype=torch.float32),
                    Limit("head_dim", "head dim", "a Triton program holds every head's tiles "
                          "in registers, the head dim padded to a power of two", 64)),
            conditions=("offsets inside one sample < 2³¹",)),
)}

def capability(op, backend):
    """The declaration of ``backend`` for ``op``."""
    return CAPABILITIES[op, backend]


def declared_backends(op):
    """The backends with a declaration for ``op``, in ``BACKENDS`` order."""
    return tuple(b for b in BACKENDS if (op, b) in CAPABILITIES)


def get_operator(name):
    """The ``Operator`` declaration named ``name``."""
    return OPERATORS[OPERATOR_NAMES.index(name)]


def feature_reasons(op, backend, name, used):
    """``[reason]`` when the call ``used`` the optional feature ``name`` of ``op`` and
    ``backend`` does not run it, else ``[]``."""
    if not used or name in capability(op, backend).features:
        return []
    what = dict(get_operator(op).features)[name]
    runs = [b for b in declared_backends(op) if name in capability(op, b).features]
    return [f"the {backend} kernels have no {what}; it runs on the {' / '.join(runs)} backend"]


def automatic_order(op):
    """The kernel backends an automatic choice tries on CUDA tensors, in order."""
    return get_operator(op).order


def limit_reasons(op, backend, name, value, subject, dtype=None, **keys):
    """``[reason]`` when ``value`` of the size ``name`` passes ``backend``'s limit for
    ``op``, else ``[]`` (also when the backend has no such limit, or the limit holds for
    another dtype than ``dtype``). ``subject`` names the argument and its value, e.g.
    ``"head dim 160"``; ``keys`` gives the size a stepped limit depends on."""
    limit = capability(op, backend).limit(name)
    if limit is None or (limit.dtype is not None and dtype != limit.dtype):
        return []
    key = keys[limit.key] if limit.steps else None
    bound = limit.bound(key)
    if value <= bound:
        return []
    where = f" ({limit.key.replace('_', ' ')} {key})" if limit.steps else ""
    return [f"{subject} > {bound}{where}: {limit.why}"]


def dtype_reasons(op, backend, tensors):
    """Why ``backend`` cannot take the floating-point dtypes of ``tensors`` ([] if it can)."""
    reasons = []
    for dtype in dict.fromkeys(t.dtype for t in tensors if t.dtype.is_floating_point):
        if dtype not in capability(op, backend).dtypes:
            runs = [b for b in declared_backends(op) if dtype in capability(op, b).dtypes]
            name = str(dtype).removeprefix("torch.")
            reasons.append(f"{name} runs only on the {' / '.join(runs)} backend" if runs else
                           f"{name} is not supported")
    return reasons


def exported_limits():
    """``{export_name: value}`` of every limit the CUDA builds export as an op."""
    return {export_name(c.op, limit): limit.value for c in CAPABILITIES.values()
            if c.backend == "cuda" for limit in c.limits}


def export_name(op, limit):
    """The ``<name>() -> int`` op a CUDA build exports ``limit`` of ``op`` as."""
    return f"{op}_{limit.name}_limit"


# --------------------------------------------------------------------------- rendering

def _number(n):
    return "2³¹ − 1" if n == INT32_MAX else str(n)


def _limits_cell(cap, op):
    parts = [limit.describe() for limit in cap.limits] + list(cap.conditions)
    parts += [f"no {what}" for name, what in op.features if name not in cap.features]
    if op.semantics and cap.backend == "reference":
        parts.append(f"{op.semantics} (all backends)")
    return "; ".join(parts) or "none"


def support_matrix_markdown():
    """The README's support matrix: operator × backend, dtypes, forward / backward,
    float32 arithmetic, architectures and limits. ``python -m pyvit_ops.info
    --markdown`` prints it."""
    lines = ["| operator | backend | dtypes | fwd / bwd | float32 arithmetic | architectures "
             "| limits |", "|---|---|---|---|---|---|---|"]
    for op in OPERATORS:
        for backend in declared_backends(op.name):
            cap = capability(op.name, backend)
            name = ", ".join(f"`{f}`" for f in op.functions) if backend == "reference" else ""
            dtypes = ", ".join(_DTYPE_NAMES[d] for d in cap.dtypes)
            passes = " / ".join("✓" if ok else "✗" for ok in (cap.forward, cap.backward))
            lines.append(f"| {name} | {backend} | {dtypes} | {passes} | {cap.float32} | "
                         f"{cap.architectures} | {_limits_cell(cap, op)} |")
    lines.append("")
    lines.append("Automatic order on CUDA tensors (the reference runs CPU tensors and "
                 "whatever no kernel backend can run):")
    lines.append("")
    for op in OPERATORS:
        lines.append(f"- `{op.name}`: {', '.join(op.order)}, then the reference. "
                     f"Why: {op.order_reason}.")
    return "\n".join(lines) + "\n"
