"""Property-based parity testing (tests/test_fuzz.py): hypothesis strategies that draw
cases of each operator within its supported space, the settings profile that bounds
the budget, and a tally of every case that ran.

A case is a frozen dataclass of plain values (shapes, dtypes, options and the seed
of its tensors), so its ``repr`` names it exactly and an edge can be written down as
an explicit example. The tensors are built from the case by the tests.

Budget: ``PYVIT_OPS_FUZZ_EXAMPLES`` (int) sets ``max_examples`` per test (default
``DEFAULT_EXAMPLES``, sized for CI on the Triton interpreter). Draws are derandomized,
so a CI run is reproducible; a larger budget explores further along the same
sequence. ``PYVIT_OPS_FUZZ_REPORT=path`` makes the tests' conftest write the tally
as JSON.
"""
import collections
import contextlib
import dataclasses
import json
import math
import os
from typing import Optional, Tuple

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

ENV_EXAMPLES = "PYVIT_OPS_FUZZ_EXAMPLES"
ENV_REPORT = "PYVIT_OPS_FUZZ_REPORT"
DEFAULT_EXAMPLES = 10
PROFILE = "pyvit_ops-fuzz"

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Real ViT head dims; 48, 80 and 96 are padded inside the kernels.
HEAD_DIMS = (16, 32, 48, 64, 80, 96, 128)
OUTCOMES = ("passed", "failed", "not_runnable")
_WORST_FIRST = ("failed", "not_runnable", "passed")


def examples_budget():
    """``max_examples`` per test: ``PYVIT_OPS_FUZZ_EXAMPLES`` or the default."""
    raw = os.environ.get(ENV_EXAMPLES)
    if raw is None or raw == "":
        return DEFAULT_EXAMPLES
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{ENV_EXAMPLES}: expected a positive int, got {raw!r}")
    return value


def fuzz_settings():
    """The settings profile of the fuzz tests (registered on first use)."""
    settings.register_profile(
        PROFILE,
        max_examples=examples_budget(),
        # The interpreter takes seconds per case, varying with the drawn shape.
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    return settings.get_profile(PROFILE)


# --------------------------------------------------------------------------- tally


def summary(exc):
    """The first line of an error, with assert_close's greatest difference if any."""
    lines = [line.strip() for line in str(exc).strip().splitlines()]
    worst = [line for line in lines if line.startswith("Greatest absolute difference")]
    return "; ".join((lines[:1] or [""]) + worst[:1])


class _Record:
    def __init__(self):
        self.outcome = "passed"
        self.detail = ""

    def not_runnable(self, reason):
        self.outcome, self.detail = "not_runnable", reason


class Tally:
    """Every execution of a case, per (operator, backend).

    Hypothesis runs some cases more than once (replaying and shrinking a failure), so
    both are kept: ``executions`` counts every run, and each distinct case counts once
    under its worst outcome (failed, not runnable, passed).
    """

    def __init__(self):
        self.executions = collections.Counter()
        self.cases = collections.defaultdict(dict)  # (op, backend) -> {case repr: outcome}
        self.failures = {}  # (op, backend, case repr) -> first line of the error

    @contextlib.contextmanager
    def record(self, op, backend, case):
        """Counts the body as one run of ``case``: passed, failed (an exception,
        re-raised) or not runnable (``record.not_runnable(reason)``)."""
        rec = _Record()
        try:
            yield rec
        except Exception as exc:
            rec.outcome, rec.detail = "failed", f"{type(exc).__name__}: {summary(exc)}"
            raise
        finally:
            self._add(op, backend, repr(case), rec)

    def _add(self, op, backend, key, rec):
        self.executions[op, backend] += 1
        seen = self.cases[op, backend]
        if key in seen and _WORST_FIRST.index(seen[key]) <= _WORST_FIRST.index(rec.outcome):
            return  # as bad an outcome of this case is already recorded
        seen[key] = rec.outcome
        if rec.outcome == "failed":
            self.failures[op, backend, key] = rec.detail

    def rows(self):
        rows = []
        for (op, backend), seen in sorted(self.cases.items()):
            counts = collections.Counter(seen.values())
            rows.append(dict(op=op, backend=backend, cases=len(seen),
                             **{o: counts[o] for o in OUTCOMES},
                             executions=self.executions[op, backend]))
        return rows

    def table(self):
        """The tally as text lines: one row per (operator, backend), then the failures."""
        header = ("op", "backend", "cases", *OUTCOMES, "executions")
        body = [tuple(str(r[h]) for h in header) for r in self.rows()]
        widths = [max(len(c) for c in col) for col in zip(header, *body)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in [header, *body]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        for (op, backend, key), detail in sorted(self.failures.items()):
            lines.append(f"FAILED {op} [{backend}] {key}: {detail}")
        return lines

    def to_json(self):
        return dict(max_examples=examples_budget(), rows=self.rows(),
                    failures=[dict(op=op, backend=b, case=key, error=detail)
                              for (op, b, key), detail in sorted(self.failures.items())])

    def write_json(self, path):
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=2)
            f.write("\n")


TALLY = Tally()


# --------------------------------------------------------------------------- cases


@dataclasses.dataclass(frozen=True)
class SdpaCase:
    """``layout``: how q, k, v are laid out (see the test's builder); ``bias``: None,
    "float" (q's dtype), "float32" or "bool", broadcast as ``bias_shape``;
    ``bias_expanded``: the bias is a stride-0 expansion of its key row."""
    dtype: torch.dtype = torch.float32
    batch: Tuple[int, ...] = (1,)
    nq: int = 1
    nk: int = 1
    d: int = 16
    layout: str = "contiguous"
    bias: Optional[str] = None
    bias_shape: Optional[Tuple[int, ...]] = None
    bias_expanded: bool = False
    scale: Optional[float] = None
    dropout_p: float = 0.0
    strided_dout: bool = False
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class WindowCase:
    """``table`` / ``pad`` / ``cosine``: None, "input" (q's dtype) or "float32";
    ``cosine``: Swin V2's cosine attention, the logit scale in that dtype (``scale``
    then None)."""
    dtype: torch.dtype = torch.float32
    batch: int = 1
    grid: Tuple[int, int] = (1, 1)
    heads: int = 1
    d: int = 16
    window: Tuple[int, int] = (1, 1)
    shift: Tuple[int, int] = (0, 0)
    table: Optional[str] = None
    pad: Optional[str] = None
    cosine: Optional[str] = None
    scale: Optional[float] = None
    mask_value: float = -100.0
    layout: str = "packed"
    strided_dout: bool = False
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class ElsaCase:
    """``ghost``: "none", "mul", "add" or "both", in ``ghost_dtype`` ("input" or
    "float32"); ``probs``: attn holds probabilities (apply_softmax=False)."""
    dtype: torch.dtype = torch.float32
    batch: int = 1
    heads: int = 1
    head_channels: int = 1
    grid: Tuple[int, int] = (1, 1)
    kernel_size: int = 3
    dilation: int = 1
    ghost: str = "none"
    ghost_dtype: str = "input"
    channels_last: bool = False
    probs: bool = False
    layout: str = "plain"
    strided_dout: bool = False
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class PoolCase:
    """``padding`` None means kernel_size // 2; ``subtract_input`` is the PoolFormer
    ``pool(x) - x`` variant (stride 1, odd kernel, default padding)."""
    dtype: torch.dtype = torch.float32
    shape: Tuple[int, int, int, int] = (1, 1, 1, 1)
    kernel_size: Tuple[int, int] = (3, 3)
    stride: Tuple[int, int] = (1, 1)
    padding: Optional[Tuple[int, int]] = None
    subtract_input: bool = False
    layout: str = "nchw"
    strided_dout: bool = False
    seed: int = 0


SDPA_LAYOUTS = ("contiguous", "packed", "batch_reversed", "strided_d", "kv_expanded")
WINDOW_LAYOUTS = ("packed", "mixed", "contiguous", "strided_d")
ELSA_LAYOUTS = ("plain", "v_slice", "attn_step")
POOL_LAYOUTS = ("nchw", "channels_last", "channel_slice", "spatial_crop", "w_step_2",
                "nhwc_crop")

# Edges first: hypothesis draws the boundaries of a range often and shrinks towards
# the first element of a sampled list.
_seeds = st.integers(0, 2 ** 31 - 1)


def _edge_int(lo, hi, *edges):
    """An int in [lo, hi], the listed edges drawn as often as the rest together."""
    edges = sorted(e for e in {lo, hi, *edges} if lo <= e <= hi)
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi))


@st.composite
def sdpa_cases(draw):
    """Batch dims of size 1 to 3 (at most 8 heads' worth), 1 to 40 tokens (Nq = 1:
    class attention), head dims 16..128, every bias broadcast pattern, dropout."""
    batch = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=3)
                       .filter(lambda b: math.prod(b) <= 8)))
    layout = draw(st.sampled_from(SDPA_LAYOUTS))
    nq = draw(_edge_int(1, 40, 16, 17))
    # Packed q, k, v come from one projection of the same tokens.
    nk = nq if layout == "packed" else draw(_edge_int(1, 40, 32, 33))
    bias = draw(st.sampled_from((None, "float", "float32", "bool")))
    bias_shape, bias_expanded = None, False
    if bias is not None:
        full = (*batch, nq, nk)
        kept = draw(st.lists(st.booleans(), min_size=len(full), max_size=len(full)))
        rank = draw(st.integers(2, len(full)))  # leading broadcast dims left out
        bias_shape = tuple(n if k else 1 for n, k in zip(full, kept))[len(full) - rank:]
        bias_expanded = bias != "bool" and draw(st.booleans())
    return SdpaCase(
        dtype=draw(st.sampled_from(DTYPES)), batch=batch, nq=nq, nk=nk,
        d=draw(st.sampled_from(HEAD_DIMS)), layout=layout, bias=bias, bias_shape=bias_shape,
        bias_expanded=bias_expanded, scale=draw(st.sampled_from((None, 0.37, 1.0))),
        dropout_p=draw(st.sampled_from((0.0, 0.0, 0.0, 0.3))),
        strided_dout=draw(st.booleans()), seed=draw(_seeds))


# Both kernel backends hold a window of up to 64 tokens in one score tile; larger ones
# (up to Swin 384's 12x12 here) only the tiled Triton kernels take (the cuda backend
# counts them as not runnable).
MAX_WINDOW_AREA = 64
MAX_TILED_WINDOW_AREA = 144


@st.composite
def window_cases(draw):
    """Windows 1x1 to 8x8 (area <= 64, non-square) and, one case in four, 6x11 to 12x12
    (area 65..144: the tiled Triton kernels), one to three windows per axis with a
    ragged last one (padding), shifts 0..window - 1, tables and pads in q's dtype or
    float32, Swin V2's cosine attention (logit scale in q's dtype or float32), soft and
    -inf masks, q / k / v as strided views."""
    tiled = draw(st.integers(0, 3)) == 0
    if tiled:
        wh = draw(_edge_int(6, 12, 12))
        ww = draw(_edge_int(MAX_WINDOW_AREA // wh + 1, min(12, MAX_TILED_WINDOW_AREA // wh), 12))
    else:
        wh = draw(_edge_int(1, 8, 7))
        ww = draw(_edge_int(1, min(8, MAX_WINDOW_AREA // wh), 7))
    # At most 12 (window, head) pairs per image (2 of the tiled windows) keep the
    # interpreter quick.
    batch, heads = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    windows = max(1, (2 if tiled else 12) // (batch * heads))
    nh = draw(st.integers(1, min(3, windows)))
    nw = draw(st.integers(1, max(1, windows // nh)))
    grid = tuple(draw(st.integers(max(w, (n - 1) * w + 1), n * w)) for n, w in ((nh, wh), (nw, ww)))
    shift = tuple(draw(st.one_of(st.sampled_from((0, w - 1)), st.integers(0, w - 1)))
                  for w in (wh, ww))
    params = st.sampled_from((None, "input", "float32"))
    d = draw(st.sampled_from(HEAD_DIMS))
    cosine = draw(params)
    return WindowCase(
        dtype=draw(st.sampled_from(DTYPES)), batch=batch, grid=grid, heads=heads,
        d=d, window=(wh, ww),
        shift=shift, table=draw(params), pad=draw(params), cosine=cosine,
        # The window tests' fixed fp32 atol holds for logits up to ~2x timm's scale
        # D ** -0.5: scale 1 at D = 32 gives |dq| ~ 10 and errors of 2e-5 (PyTorch's own:
        # 4e-6), 0.37 at D = 96 errors of 1.6e-5 on the cuda backend.
        # Negative scales flip every score: padded key slots must stay -inf.
        # Cosine attention takes no scale.
        scale=None if cosine else draw(st.sampled_from((None, 2 * d ** -0.5, -(d ** -0.5)))),
        mask_value=draw(st.sampled_from((-100.0, -2.5, float("-inf")))),
        layout=draw(st.sampled_from(WINDOW_LAYOUTS)), strided_dout=draw(st.booleans()),
        seed=draw(_seeds))


@st.composite
def elsa_cases(draw):
    """Heads of 1 to 32 channels, K 1..9 with dilation 1..3 on grids from one pixel to
    larger than the window, each ghost combination, NCHW / channels_last, logits or
    probabilities, strided v / attn."""
    k = draw(st.sampled_from((3, 7, 1, 5, 9)))
    # The interpreter's time grows with batch * heads * taps (programs times unrolled
    # taps), then with the pixels: at most ~60, and 600 with the pixels.
    batch = draw(st.integers(1, 2))
    heads = draw(st.integers(1, max(1, min(3, 60 // (batch * k * k)))))
    pixels = max(1, 600 // (batch * heads * k * k))
    h = draw(_edge_int(1, min(12, pixels), 2))
    w = draw(_edge_int(1, min(12, max(1, pixels // h)), 3))
    return ElsaCase(
        dtype=draw(st.sampled_from(DTYPES)), batch=batch, heads=heads,
        head_channels=draw(st.sampled_from((1, 2, 3, 5, 8, 32))), grid=(h, w), kernel_size=k,
        dilation=draw(st.sampled_from((1, 2, 3))),
        ghost=draw(st.sampled_from(("both", "none", "mul", "add"))),
        ghost_dtype=draw(st.sampled_from(("input", "float32"))),
        channels_last=draw(st.booleans()), probs=draw(st.booleans()),
        layout=draw(st.sampled_from(ELSA_LAYOUTS)), strided_dout=draw(st.booleans()),
        seed=draw(_seeds))


@st.composite
def pool_cases(draw):
    """PoolFormer's ``pool(x) - x`` (odd kernels 1..7 per axis, square or not: the
    centre tap's row and column offsets differ only then) or a general pooling (kernel
    1..7 per axis, stride 1..3, padding 0..k // 2), on grids down to a single pixel
    and smaller than the kernel, in every memory layout."""
    subtract_input = draw(st.booleans())
    if subtract_input:
        k = draw(st.sampled_from((3, 5, 7, 1)))
        kernel_size = (k, draw(st.sampled_from((k, 3, 5, 7, 1))))
        stride, padding = (1, 1), None
    else:
        kernel_size = (draw(st.integers(1, 7)), draw(st.integers(1, 7)))
        stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
        padding = draw(st.one_of(st.none(), st.tuples(*(st.integers(0, k // 2)
                                                        for k in kernel_size))))
    pad = padding or (kernel_size[0] // 2, kernel_size[1] // 2)
    channels = draw(st.sampled_from((3, 1, 2, 5, 17, 33)))
    # Many channels (the wide channels_last tiles) on small grids: the interpreter's
    # time grows with the element count.
    top = 14 if channels <= 5 else 8
    # The output needs one in-image window per axis: H >= k - 2 * padding.
    hw = [draw(_edge_int(max(1, k - 2 * p), top)) for k, p in zip(kernel_size, pad)]
    shape = (draw(st.integers(1, 2)), channels, *hw)
    return PoolCase(
        dtype=draw(st.sampled_from(DTYPES)), shape=shape, kernel_size=kernel_size,
        stride=stride, padding=padding, subtract_input=subtract_input,
        layout=draw(st.sampled_from(POOL_LAYOUTS)), strided_dout=draw(st.booleans()),
        seed=draw(_seeds))
