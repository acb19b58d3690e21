"""Static compile specs of the avg_pool2d Triton kernels: every (kernel, layout and
tile, dtype) the launchers of ``pyvit_ops.kernels.avg_pool2d`` can pick, for each
pooling geometry of ``_POOLS``."""
from typing import NamedTuple

from pyvit_ops.kernels import avg_pool2d as kernels


class _Args(NamedTuple):
    """A kernel's runtime arguments by role."""

    pointers: tuple   # data tensors, all of the pooled dtype
    sizes: tuple      # int32 sizes
    strides: tuple    # the data tensors' (b, c, h, w) stride tuples


_ARGS = {
    kernels._avg_pool2d_fwd_kernel: _Args(
        pointers=("x_ptr", "out_ptr"), sizes=("C", "H", "W", "OH", "OW"),
        strides=("stride_x", "stride_out")),
    kernels._avg_pool2d_bwd_kernel: _Args(
        pointers=("dout_ptr", "dx_ptr"), sizes=("C", "H", "W", "OH", "OW"),
        strides=("stride_dout", "stride_dx")),
}
# Position in (b, c, h, w) of the contiguous axis, whose strides are 1: Triton turns them
# into the constexpr 1 at run time for dense tensors.
_UNIT_AXIS = {False: 3, True: 1}   # keyed by channels_last: w for NCHW, c for channels_last

# PoolFormer's token mixer with kernels 3/5/7 (the unrolled row of taps, and so the
# registers, grows with the kernel width) and a strided pool (the backward's other loop
# shape): (kernel_size, stride, padding, subtract_input).
_POOLS = [(3, 1, 1, True), (5, 1, 2, True), (7, 1, 3, True), (3, 2, 1, False)]
_DTYPES = ("fp32", "fp16", "bf16")


def _layouts():
    """(channels_last, (BLOCK_C, BLOCK_H, BLOCK_W)) of every tile the launchers pick."""
    return ([(False, tile) for tile in kernels._NCHW_TILES.values()]
            + [(True, tile) for tile in kernels._CHANNELS_LAST_TILES.values()])


def _spec(kernel, channels_last, tile, pool, dtype):
    args = _ARGS[kernel]
    (block_c, block_h, block_w), (k, s, p, sub) = tile, pool
    constexprs = dict(POOL=kernels.Pool(k, k, s, s, p, p), SUBTRACT=sub,
                      CHANNELS_LAST=channels_last, BLOCK_C=block_c, BLOCK_H=block_h,
                      BLOCK_W=block_w)
    unit = _UNIT_AXIS[channels_last]
    types = {name: f"*{dtype}" for name in args.pointers}
    types.update({name: "i32" for name in args.sizes})
    types.update({name: tuple(1 if axis == unit else "i32" for axis in range(4))
                  for name in args.strides})
    types.update({name: "constexpr" for name in constexprs})
    return {
        "name": (f"{kernel.__name__}_{'cl' if channels_last else 'nchw'}"
                 f"_c{block_c}h{block_h}w{block_w}_k{k}s{s}p{p}{'_sub' if sub else ''}_{dtype}"),
        "fn": kernel, "signature": {name: types[name] for name in kernel.arg_names},
        "constexprs": constexprs, "num_warps": kernels._NUM_WARPS[kernel],
        "num_stages": kernels._NUM_STAGES}


def static_compile_specs():
    """Every (kernel, layout and tile, pooling geometry, dtype) combination."""
    return [_spec(kernel, channels_last, tile, pool, dtype) for kernel in _ARGS
            for channels_last, tile in _layouts() for pool in _POOLS for dtype in _DTYPES]
