"""Static compile specs of the ELSA Triton kernels (``pyvit_ops.kernels.elsa_attention``):
every (kernel, tile config, dtype) its launchers can pick, for ``pyvit_ops.testing.static``.

Each kernel's arguments are described explicitly below (pointers with their element
type, strided tensors with their kind, integer sizes): an argument the tables do not
describe is an error, so renaming one in a kernel cannot silently change a spec."""
from typing import NamedTuple

import triton

from pyvit_ops.kernels import elsa_attention as kernels

_TRITON_DTYPES = ("fp16", "bf16", "fp32")


class _Tensor(NamedTuple):
    """A pointer argument ``<name>_ptr`` and, for a strided tensor, its tuple of strides
    ``stride_<name>``."""
    name: str
    element: str        # "data" (the inputs' dtype), "ghost" (the ghost dtype), "fp32" (scratch)
    kind: str = ""      # "pixels" (C channels), "taps" (G*K*K channels), "ghost" (C, K, K)
    axes: str = ""      # the axes of the stride tuple, in order


# Stride axes whose values are multiples of 16 at ELSA-Swin's shapes (C = 96, 32 channels
# per head, 56², K = 7), per (kind, channels_last). The unit stride is the last axis for
# NCHW and the channel axis for channels_last, ghosts included (the launchers read them
# through a (K, K, C)-contiguous copy); a ghost's NCHW strides are K*K and K.
_DIVISIBLE_AXES = {("pixels", False): "bc", ("pixels", True): "bhw",
                   ("taps", False): "bc", ("taps", True): "b",
                   ("ghost", False): "", ("ghost", True): "hw"}


class _Kernel(NamedTuple):
    fn: object
    tensors: tuple      # of _Tensor
    sizes: tuple        # i32 size arguments
    divisible: tuple    # the sizes that are multiples of 16 at ELSA-Swin's shapes
    transposed: bool = None   # the aggregation kernel's TRANSPOSED: False forward, True dv


def _pixels(name):
    return _Tensor(name, "data", "pixels", "bchw")


_ATTN = _Tensor("attn", "data", "taps", "bchw")
_MUL = _Tensor("mul", "ghost", "ghost", "chw")
_ADD = _Tensor("add", "ghost", "ghost", "chw")


def _aggregate(lse, transposed):
    """The aggregation kernel; ``lse``: the element type of its lse pointer."""
    return _Kernel(kernels._elsa_attention_aggregate_kernel,
                   (_pixels("x"), _ATTN, _MUL, _ADD, _Tensor("lse", lse), _pixels("y")),
                   ("G", "CG", "H", "W"), ("CG",), transposed)


_KERNELS = {
    "fwd": _aggregate("data", False),   # attn stands in for the unread lse
    "bwd_attn": _Kernel(kernels._elsa_attention_bwd_attn_kernel,
                        (_pixels("dout"), _pixels("v"), _ATTN, _MUL,
                         _Tensor("dattn", "data", "taps", "bchw"),
                         _Tensor("lse", "fp32"), _Tensor("mean", "fp32"),
                         _Tensor("part_mul", "fp32"), _Tensor("part_add", "fp32")),
                        ("B", "G", "C", "CG", "H", "W", "B_CHUNK", "T_CHUNK"), ("C", "CG")),
    "bwd_v": _aggregate("fp32", True),
}


def _spec_tiles(K=7):
    """Every TileConfig the launchers can pick at window K: (channels_last, config)."""
    tiles = []
    for block_c in (8, 16, 32, 64, kernels.MAX_HEAD_CHANNELS):
        tiles.append((False, kernels._tile(block_c, 32, K)))
        tiles += [(True, kernels._tile(block_c, p, K)) for p in kernels._CL_PIXELS
                  if block_c * p <= kernels._MAX_TILE_CL]
    return tiles


def _arguments(kernel, channels_last, dtype, ghost_dtype, dilation, div16):
    """``{argument: (type, [what of it is divisible by 16])}`` of every runtime argument;
    the unit strides and a dilation of 1 are the constant 1 the JIT specialises them to."""
    element = {"data": dtype, "ghost": ghost_dtype or dtype, "fp32": "fp32"}
    args = {}
    for t in kernel.tensors:
        args[f"{t.name}_ptr"] = (f"*{element[t.element]}", [])
        if t.axes:
            name, unit = f"stride_{t.name}", "c" if channels_last else t.axes[-1]
            divisible = _DIVISIBLE_AXES[(t.kind, channels_last)] if div16 else ""
            args[name] = (tuple(1 if axis == unit else "i32" for axis in t.axes),
                          [(name, i) for i, axis in enumerate(t.axes) if axis in divisible])
    for size in kernel.sizes:
        args[size] = ("i32", [size] if div16 and size in kernel.divisible else [])
    args["DIL"] = (1 if dilation == 1 else "i32", [])
    return args


def _spec(key, channels_last, cfg, dtype, K=7, dilation=1, div16=False, ghost_dtype=None,
          flags=None):
    kernel = _KERNELS[key]
    fn = kernel.fn
    args = _arguments(kernel, channels_last, dtype, ghost_dtype, dilation, div16)
    attn = key == "bwd_attn"
    block_p = cfg.block_p_attn if attn else cfg.block_p
    values = dict(K=K, K_PAD=triton.next_power_of_2(K), HAS_MUL=True, HAS_ADD=True,
                  APPLY_SOFTMAX=True, CHANNELS_LAST=channels_last, NEED_DATTN=True,
                  NEED_DMUL=True, NEED_DADD=True, BLOCK_C=cfg.block_c, BLOCK_P=block_p)
    if kernel.transposed is not None:
        values["TRANSPOSED"] = kernel.transposed
    values.update(flags or {})
    signature, constexprs, divisible = {}, {}, []
    for arg in fn.arg_names:
        if arg in values:
            continue  # a constexpr option, set below
        kind, div = args.pop(arg)  # KeyError: an argument the tables do not describe
        if kind == 1:
            constexprs[arg] = 1
        else:
            signature[arg] = kind
            divisible += div
    if args:
        raise ValueError(f"{fn.__name__} has no arguments {sorted(args)}")
    constexprs.update({k: v for k, v in values.items() if k in fn.arg_names})
    signature.update({k: "constexpr" for k in constexprs})
    layout = "cl" if channels_last else "nchw"
    direction = "" if kernel.transposed is None else ("_dv" if kernel.transposed else "_fwd")
    name = (f"{fn.__name__}{direction}_{layout}_c{cfg.block_c}p{block_p}_k{K}"
            f"{'_dil' if dilation != 1 else ''}{'_div16' if div16 else ''}"
            f"{f'_ghost{ghost_dtype}' if ghost_dtype else ''}"
            + "".join(f"_{k.lower()}{int(v)}" for k, v in (flags or {}).items()) + f"_{dtype}")
    options = kernels.launch_options(cfg.num_warps_attn if attn else cfg.num_warps)
    return {"name": name, "fn": fn, "signature": signature, "constexprs": constexprs,
            "divisible_by_16": divisible, "dtype": dtype, **options}


def _ghost_sum_spec(dtype):
    fn = kernels._elsa_attention_bwd_ghost_kernel
    return {"name": f"{fn.__name__}_{dtype}", "fn": fn,
            "signature": {"part_ptr": "*fp32", "out_ptr": f"*{dtype}", "PARTS": "i32",
                          "N": "i32", "BLOCK": "constexpr"},
            "constexprs": {"BLOCK": kernels._GHOST_BLOCK}, "divisible_by_16": [],
            "dtype": dtype, **kernels.launch_options(kernels._GHOST_WARPS)}


def static_compile_specs():
    """Every (kernel, tile config, dtype) the launchers can pick, at K = 7 with every
    option on (both ghost tensors, fused softmax, every gradient: the most registers),
    nothing assumed about strides but the unit one. Plus, for the ELSA-Swin head
    (32 channels): the same with the 16-divisibility the JIT sees at its shapes
    (C = 96, 56²: vectorised channels_last loads) and fp32 ghost tensors (AMP), the
    ELSA-Swin options (M = 1, lambda = 0), K = 3 and 5 and a runtime dilation."""
    specs = []
    for channels_last, cfg in _spec_tiles():
        for key in _KERNELS:
            for dtype in _TRITON_DTYPES:
                specs.append(_spec(key, channels_last, cfg, dtype))
                if cfg.block_c == 32:  # half inputs come with fp32 ghost parameters under AMP
                    specs.append(_spec(key, channels_last, cfg, dtype, div16=True,
                                       ghost_dtype="fp32"))
            if cfg.block_c == 32:
                specs.append(_spec(key, channels_last, cfg, "bf16", div16=True,
                                   ghost_dtype="fp32", flags={"HAS_MUL": False}))
                specs.append(_spec(key, channels_last, cfg, "fp16", dilation=2))
                for K in (3, 5):
                    specs += [_spec(key, cl, cfg_k, "fp16", K=K) for cl, cfg_k in _spec_tiles(K)
                              if (cl, cfg_k.block_c, cfg_k.block_p) == (channels_last, 32,
                                                                         cfg.block_p)]
    specs += [_ghost_sum_spec(dtype) for dtype in _TRITON_DTYPES]
    # Tiles that differ only in the forward's BLOCK_P share the attn-gradient kernel.
    return list({spec["name"]: spec for spec in specs}.values())
