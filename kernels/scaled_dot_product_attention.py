"""Triton kernels for scaled dot-product attention (flash-style), forward and backward.

Layout contract of the launchers: q ``(Z1, Z2, Nq, D)``, k/v ``(Z1, Z2, Nk, D)``, any
strides (the ops layer folds the user's batch dims into Z1, Z2 without copying). The
bias is None or a ``(Z1, Z2, Nq, Nk)`` view whose broadcast dims have stride 0; it is
float (added to the logits) or bool (True = attend).

Forward: one program per (query block, batch). Online softmax in the exp2 domain,
fp32 accumulation, ``tl.dot`` for both products. Logits stay in natural units and
only their differences (logit - row max, never above 0) are scaled to log2 units, so
finite logits near the float32 limit give finite results. It saves two fp32 numbers
per row, the row max m and log2 of the row sum l, apart: m + log(l) in one float32
would lose log(l) next to a large |m| (a row masked with -1e9), and the backward
would recompute probabilities Nk times too large. A row with every key masked gets
m = +inf, so every recomputed probability is exp(-inf) = 0 and its output and
gradients are 0 (torch's behaviour).

Backward, three kernels, no float atomics (deterministic):
- preprocess: delta = rowsum(dO * O);
- dk/dv (key-major): one program per key block and batch, looping over the queries;
- dq (query-major): one program per query block and batch, looping over the keys.
dbias is reduced over the bias's broadcast dims inside these kernels. The programs
of one "bias group" (the batch dims the bias is not broadcast over) walk the
broadcast batch indices themselves, in a fixed order: a bias broadcast over the
queries (e.g. a ``(B, 1, 1, Nk)`` key bias) is summed per key in registers by the
dk/dv kernel; a bias with a query axis is summed per tile by the dq kernel
in an fp32 buffer that only the owning program reads and writes (a half-precision
bias no batch index shares, e.g. at batch 1, is stored by it directly, in the bias
dtype and shape). When that leaves too few programs to fill the GPU, the broadcast
batch is split into chunks whose partial sums (``(chunks, *dbias)``, at most ~2 x SMs
/ blocks of them) are added once, in a fixed order, at the end. No ``(*batch, Nq,
Nk)`` gradient is ever formed. A bias constant along the keys (stride 0 on Nk) has an
exactly zero gradient since softmax is shift-invariant: zeros, without a kernel. With
a single key softmax is constant: dq, dk and dbias are exactly zero (no dq kernel).

Offsets: batch offsets are int64; offsets within one batch element (row or key index
x stride) are int32, except in the OFFS64 variant of each kernel (int64 row and key
strides), which the launchers pick when a tensor's extent within one batch element
reaches 2**31 (e.g. q, k, v sliced from a sequence-major (N, B, 3, heads, D)
projection). Head-dim offsets are int32 in both (the ops layer refuses larger ones).

Dropout: element (z, i, j) (z the flat batch index) is kept when the first output of
Philox-4x32 for counter (i * Nk + j, z, seed low, seed high) and key 0 is >= p * 2**32;
the same function runs in the forward, both backward kernels and ``dropout_keep_mask``.
The kernels load the seed from a one-element int64 tensor on the inputs' device
(``Seed``), never from a launch argument: the host never reads it, and a CUDA graph
replays the load, not a captured value.
"""
import math

import torch
import triton
import triton.language as tl

from pyvit_ops.kernels._common import on_tensor_device

# Head dims padded to the next power of two (masked), at most this.
MAX_HEAD_DIM = 128
# SMs of the GPU used to size the dbias batch split when the device is not CUDA
# (interpreter); A100 has 108, H100 132.
_DEFAULT_SMS = 108

BIAS_NONE, BIAS_FLOAT, BIAS_BOOL = 0, 1, 2
# Register cap passed to ptxas (.maxnreg) for the attention kernels. Without it ptxas
# (as Triton 3.8 drives it) sometimes settles at 96-168 registers and spills a few
# values in these loops; the hardware limit lets it keep them (checked per config by
# static_compile_specs).
_MAXNREG = 255

# exp2 is the native instruction: logit differences are scaled to log2 units for it.
_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _add_bias(s, ptrs, mask, BIAS: tl.constexpr):
    """Logits ``s`` plus a float bias, or -inf where a bool mask is False."""
    if BIAS == 1:
        s += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    elif BIAS == 2:
        s = tl.where(tl.load(ptrs, mask=mask, other=1) != 0, s, float("-inf"))
    return s


@triton.jit
def _dropout_keep(Seed, z, offsets, dropout_p):
    """Keep mask of the elements ``offsets`` (= row * Nk + col) of batch ``z``: the first
    Philox-4x32 output for counter (offset, z, seed low, seed high) and key 0 against
    the threshold p * 2**32. 32-bit counters keep the hash's register state small."""
    c0 = offsets.to(tl.uint32, bitcast=True)
    zero = c0 * 0
    # The seed goes in the counter, not the key: a loaded seed is not a uniform value,
    # so a key derived from it would hold its whole schedule (~20 values) in vector
    # registers across the loops; a constant key folds into the instructions.
    seed = tl.load(Seed)
    r, _, _, _ = tl.philox(0, c0, zero + z.to(tl.uint32), zero + seed.to(tl.uint32),
                           zero + (seed >> 32).to(tl.uint32))
    # (the largest fp32 below 2**32: p = 1 gets scale 0 anyway)
    threshold = tl.minimum(dropout_p * 4294967296.0, 4294967040.0).to(tl.uint32)
    return r >= threshold


@triton.jit
def _query_program(Nq, Z2, BLOCK_M: tl.constexpr):
    """(rows, flat batch z, z1, z2) of a program of the query-block-major launches (forward,
    preprocess). Query blocks of one batch are neighbours in launch order: they share
    K/V in L2."""
    num_m = tl.cdiv(Nq, BLOCK_M)
    pid = tl.program_id(0)
    z = (pid // num_m).to(tl.int64)
    rows = (pid % num_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    return rows, z, z // Z2, z % Z2


@triton.jit
def _row_stats(Lse, offs, mask):
    """The forward's (row max, log2 of the row sum) of rows ``offs`` (flat z * Nq + row);
    +inf and 0 where masked, which give probability 0."""
    ptrs = Lse + offs * 2
    return tl.load(ptrs, mask=mask, other=float("inf")), tl.load(ptrs + 1, mask=mask, other=0.0)


@triton.jit
def _probs(s, m, log2_l):
    """exp(s - m) / l from the forward's row statistics (the difference first: no
    overflow near the float32 limit)."""
    return tl.exp2((s - m) * _LOG2E - log2_l)


@triton.jit
def _wide(stride):
    """A row (or key) stride as int64, so that index x stride cannot overflow (the OFFS64
    variant: a batch element whose offsets pass 2**31, e.g. sequence-major q, k, v
    views). Head-dim offsets stay 32-bit (the ops layer refuses larger ones)."""
    return tl.cast(stride, tl.int64)


@triton.jit
def _scaled_dot_product_attention_fwd_kernel(
        Q, K, V, Bias, Out, Lse,
        Seed, sm_scale, dropout_p, dropout_scale,
        stride_qz1, stride_qz2, stride_qm, stride_qd,
        stride_kz1, stride_kz2, stride_kn, stride_kd,
        stride_vz1, stride_vz2, stride_vn, stride_vd,
        stride_bz1, stride_bz2, stride_bm, stride_bn,
        stride_oz1, stride_oz2, stride_om, stride_od,
        Z2, Nq, Nk, D,
        BIAS: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, OFFS64: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows, z, z1, z2 = _query_program(Nq, Z2, BLOCK_M)
    if OFFS64:
        stride_qm, stride_kn, stride_vn = _wide(stride_qm), _wide(stride_kn), _wide(stride_vn)
        stride_bm, stride_bn, stride_om = _wide(stride_bm), _wide(stride_bn), _wide(stride_om)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = rows < Nq
    mask_d = offs_d < D

    q = tl.load(Q + z1 * stride_qz1 + z2 * stride_qz2 + rows[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    k_base = K + z1 * stride_kz1 + z2 * stride_kz2
    v_base = V + z1 * stride_vz1 + z2 * stride_vz2
    b_base = Bias + z1 * stride_bz1 + z2 * stride_bz2 + rows[:, None] * stride_bm
    drop_rows = rows[:, None] * Nk

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, Nk, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < Nk
        kt = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=mask_d[:, None] & mask_n[None, :], other=0.0)
        s = tl.dot(q, kt, input_precision=PRECISION) * sm_scale
        s = _add_bias(s, b_base + cols[None, :] * stride_bn, mask_m[:, None] & mask_n[None, :],
                      BIAS)
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows with every key masked so far keep m = -inf; shift them by 0 to avoid inf - inf.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2((m_i - m_ref) * _LOG2E)
        p = tl.exp2((s - m_ref[:, None]) * _LOG2E)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(_dropout_keep(Seed, z, drop_rows + cols[None, :], dropout_p), p, 0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    l_ref = tl.where(empty, 1.0, l_i)
    out = acc * (dropout_scale / l_ref)[:, None]
    tl.store(Out + z1 * stride_oz1 + z2 * stride_oz2 + rows[:, None] * stride_om
             + offs_d[None, :] * stride_od, out.to(Out.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])
    stats = Lse + (z * Nq + rows) * 2
    tl.store(stats, tl.where(empty, float("inf"), m_i), mask=mask_m)
    tl.store(stats + 1, tl.log2(l_ref), mask=mask_m)


@triton.jit
def _scaled_dot_product_attention_bwd_preprocess_kernel(
        Out, DO, Delta,
        stride_oz1, stride_oz2, stride_om, stride_od,
        stride_dz1, stride_dz2, stride_dm, stride_dd,
        Z2, Nq, D,
        OFFS64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows, z, z1, z2 = _query_program(Nq, Z2, BLOCK_M)
    if OFFS64:
        stride_om, stride_dm = _wide(stride_om), _wide(stride_dm)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows < Nq)[:, None] & (offs_d < D)[None, :]
    o = tl.load(Out + z1 * stride_oz1 + z2 * stride_oz2 + rows[:, None] * stride_om
                + offs_d[None, :] * stride_od, mask=mask, other=0.0)
    do = tl.load(DO + z1 * stride_dz1 + z2 * stride_dz2 + rows[:, None] * stride_dm
                 + offs_d[None, :] * stride_dd, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + z * Nq + rows, delta, mask=rows < Nq)


@triton.jit
def _batch_coords(g, b, Z2, BCAST1: tl.constexpr, BCAST2: tl.constexpr):
    """(z1, z2) of bias group ``g`` (the non-broadcast batch dims) and broadcast index ``b``."""
    if BCAST1 and BCAST2:
        z1 = b // Z2
        z2 = b % Z2
    elif BCAST1:
        z1 = b
        z2 = g
    elif BCAST2:
        z1 = g
        z2 = b
    else:
        z1 = g // Z2
        z2 = g % Z2
    return z1, z2


@triton.jit
def _backward_program(n, NG, NB, B_CHUNK, BLOCK: tl.constexpr):
    """This backward program's (indices of its block of the ``n`` rows or keys, bias group
    g, split, first and end broadcast index): programs are ordered block-fastest, then
    group, then batch chunk."""
    num_blocks = tl.cdiv(n, BLOCK)
    pid = tl.program_id(0)
    offs = (pid % num_blocks) * BLOCK + tl.arange(0, BLOCK)
    rest = pid // num_blocks
    g = (rest % NG).to(tl.int64)
    split = rest // NG
    b_start = split.to(tl.int64) * B_CHUNK
    b_end = tl.minimum(b_start + B_CHUNK, NB)
    return offs, g, split, b_start, b_end


@triton.jit
def _scaled_dot_product_attention_bwd_dkdv_kernel(
        Q, K, V, Bias, DO, Lse, Delta, DK, DV, DBias,
        Seed, sm_scale, dropout_p, dropout_scale,
        stride_qz1, stride_qz2, stride_qm, stride_qd,
        stride_kz1, stride_kz2, stride_kn, stride_kd,
        stride_vz1, stride_vz2, stride_vn, stride_vd,
        stride_bz1, stride_bz2, stride_bm, stride_bn,
        stride_doz1, stride_doz2, stride_dom, stride_dod,
        stride_dkz1, stride_dkz2, stride_dkn, stride_dkd,
        stride_dvz1, stride_dvz2, stride_dvn, stride_dvd,
        stride_dbs, stride_dbz1, stride_dbz2, stride_dbn,
        Z2, Nq, Nk, D, NG, NB, B_CHUNK,
        BIAS: tl.constexpr, DBIAS: tl.constexpr, BCAST1: tl.constexpr, BCAST2: tl.constexpr,
        DROPOUT: tl.constexpr, PRECISION: tl.constexpr, OFFS64: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dk, dv of one key block for each batch of a chunk; with DBIAS, the gradient of
    a bias broadcast over the queries (one value per key), summed over the chunk."""
    cols, g, split, b_start, b_end = _backward_program(Nk, NG, NB, B_CHUNK, BLOCK_N)
    if OFFS64:
        stride_qm, stride_kn, stride_vn = _wide(stride_qm), _wide(stride_kn), _wide(stride_vn)
        stride_bm, stride_bn, stride_dom = _wide(stride_bm), _wide(stride_bn), _wide(stride_dom)
        stride_dkn, stride_dvn = _wide(stride_dkn), _wide(stride_dvn)
        stride_dbs, stride_dbn = _wide(stride_dbs), _wide(stride_dbn)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = cols < Nk
    mask_d = offs_d < D
    kv_mask = mask_n[:, None] & mask_d[None, :]
    dcol = tl.zeros([BLOCK_N], tl.float32)

    for i in range(0, b_end - b_start):
        z1, z2 = _batch_coords(g, b_start + i, Z2, BCAST1, BCAST2)
        z = z1 * Z2 + z2
        k = tl.load(K + z1 * stride_kz1 + z2 * stride_kz2 + cols[:, None] * stride_kn
                    + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(V + z1 * stride_vz1 + z2 * stride_vz2 + cols[:, None] * stride_vn
                    + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        q_base = Q + z1 * stride_qz1 + z2 * stride_qz2
        do_base = DO + z1 * stride_doz1 + z2 * stride_doz2
        b_base = Bias + z1 * stride_bz1 + z2 * stride_bz2
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for start_m in range(0, Nq, BLOCK_M):
            rows = start_m + offs_m
            mask_m = rows < Nq
            qo_mask = mask_m[:, None] & mask_d[None, :]
            # Tiles are keys x queries, so that dk, dv need no transpose. q and dO are read
            # once and transposed for k q^T and v dO^T (a layout change of the dot
            # operand), not read a second time.
            q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                        mask=qo_mask, other=0.0)
            do = tl.load(do_base + rows[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                         mask=qo_mask, other=0.0)
            # Padded rows get row max +inf, hence probability 0.
            m, log2_l = _row_stats(Lse, z * Nq + rows, mask_m)
            st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * sm_scale
            st = _add_bias(st, b_base + rows[None, :] * stride_bm + cols[:, None] * stride_bn,
                           mask_n[:, None] & mask_m[None, :], BIAS)
            pt = _probs(st, m[None, :], log2_l[None, :])
            # (this order of the products is the one measured spill-free in every config)
            if DROPOUT:
                keep = _dropout_keep(Seed, z, rows[None, :] * Nk + cols[:, None], dropout_p)
                pdt = tl.where(keep, pt * dropout_scale, 0.0)
            else:
                pdt = pt
            dv = tl.dot(pdt.to(do.dtype), do, dv, input_precision=PRECISION)
            dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            if DROPOUT:
                dpt = tl.where(keep, dpt * dropout_scale, 0.0)
            delta = tl.load(Delta + z * Nq + rows, mask=mask_m, other=0.0)
            dst = pt * (dpt - delta[None, :])
            dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=PRECISION)
            if DBIAS:
                dcol += tl.sum(dst, 1)
        tl.store(DK + z1 * stride_dkz1 + z2 * stride_dkz2 + cols[:, None] * stride_dkn
                 + offs_d[None, :] * stride_dkd, (dk * sm_scale).to(DK.dtype.element_ty),
                 mask=kv_mask)
        tl.store(DV + z1 * stride_dvz1 + z2 * stride_dvz2 + cols[:, None] * stride_dvn
                 + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=kv_mask)

    if DBIAS:
        z1, z2 = _batch_coords(g, b_start, Z2, BCAST1, BCAST2)
        tl.store(DBias + split * stride_dbs + z1 * stride_dbz1 + z2 * stride_dbz2
                 + cols * stride_dbn, dcol, mask=mask_n)


@triton.jit
def _scaled_dot_product_attention_bwd_dq_kernel(
        Q, K, V, Bias, DO, Lse, Delta, DQ, DBias,
        Seed, sm_scale, dropout_p, dropout_scale,
        stride_qz1, stride_qz2, stride_qm, stride_qd,
        stride_kz1, stride_kz2, stride_kn, stride_kd,
        stride_vz1, stride_vz2, stride_vn, stride_vd,
        stride_bz1, stride_bz2, stride_bm, stride_bn,
        stride_doz1, stride_doz2, stride_dom, stride_dod,
        stride_dqz1, stride_dqz2, stride_dqm, stride_dqd,
        stride_dbs, stride_dbz1, stride_dbz2, stride_dbm, stride_dbn,
        Z2, Nq, Nk, D, NG, NB, B_CHUNK,
        BIAS: tl.constexpr, DBIAS: tl.constexpr, DBIAS_DIRECT: tl.constexpr,
        BCAST1: tl.constexpr, BCAST2: tl.constexpr,
        DROPOUT: tl.constexpr, PRECISION: tl.constexpr, OFFS64: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dq of one query block for each batch of a chunk; with DBIAS, the gradient of a
    bias with a query axis, summed over the chunk's batches in an fp32 buffer that only
    this program touches: a read-add-write in a fixed order (no atomics). With
    DBIAS_DIRECT (one batch index, no split: its ds is the gradient) DBias is dbias
    itself, stored once in the bias dtype: no fp32 buffer and no cast pass."""
    rows, g, split, b_start, b_end = _backward_program(Nq, NG, NB, B_CHUNK, BLOCK_M)
    if OFFS64:
        stride_qm, stride_kn, stride_vn = _wide(stride_qm), _wide(stride_kn), _wide(stride_vn)
        stride_bm, stride_bn, stride_dom = _wide(stride_bm), _wide(stride_bn), _wide(stride_dom)
        stride_dqm, stride_dbs = _wide(stride_dqm), _wide(stride_dbs)
        stride_dbm, stride_dbn = _wide(stride_dbm), _wide(stride_dbn)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = rows < Nq
    mask_d = offs_d < D
    qo_mask = mask_m[:, None] & mask_d[None, :]

    for i in range(0, b_end - b_start):
        z1, z2 = _batch_coords(g, b_start + i, Z2, BCAST1, BCAST2)
        z = z1 * Z2 + z2
        q = tl.load(Q + z1 * stride_qz1 + z2 * stride_qz2 + rows[:, None] * stride_qm
                    + offs_d[None, :] * stride_qd, mask=qo_mask, other=0.0)
        do = tl.load(DO + z1 * stride_doz1 + z2 * stride_doz2 + rows[:, None] * stride_dom
                     + offs_d[None, :] * stride_dod, mask=qo_mask, other=0.0)
        m, log2_l = _row_stats(Lse, z * Nq + rows, mask_m)
        delta = tl.load(Delta + z * Nq + rows, mask=mask_m, other=0.0)
        k_base = K + z1 * stride_kz1 + z2 * stride_kz2
        v_base = V + z1 * stride_vz1 + z2 * stride_vz2
        b_base = Bias + z1 * stride_bz1 + z2 * stride_bz2
        db_base = DBias + split * stride_dbs + z1 * stride_dbz1 + z2 * stride_dbz2
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, Nk, BLOCK_N):
            cols = start_n + offs_n
            mask_n = cols < Nk
            kv_mask = mask_n[:, None] & mask_d[None, :]
            tile_mask = mask_m[:, None] & mask_n[None, :]
            k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                        mask=kv_mask, other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                        mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale
            s = _add_bias(s, b_base + rows[:, None] * stride_bm + cols[None, :] * stride_bn,
                          tile_mask, BIAS)
            # Padded keys: -inf (probability 0); else exp(0 - m) could even overflow.
            s = tl.where(mask_n[None, :], s, float("-inf"))
            p = _probs(s, m[:, None], log2_l[:, None])
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            if DROPOUT:
                keep = _dropout_keep(Seed, z, rows[:, None] * Nk + cols[None, :], dropout_p)
                dp = tl.where(keep, dp * dropout_scale, 0.0)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
            if DBIAS:
                ptrs = db_base + rows[:, None] * stride_dbm + cols[None, :] * stride_dbn
                if DBIAS_DIRECT:
                    tl.store(ptrs, ds.to(DBias.dtype.element_ty), mask=tile_mask)
                else:
                    # The buffer is padded to whole tiles (padded entries receive ds = 0),
                    # so these accesses need no mask and stay vectorised. The first
                    # batch of the chunk starts from 0 instead of reading.
                    ds += tl.load(ptrs, mask=i > 0, other=0.0)
                    tl.store(ptrs, ds)
        tl.store(DQ + z1 * stride_dqz1 + z2 * stride_dqz2 + rows[:, None] * stride_dqm
                 + offs_d[None, :] * stride_dqd, (dq * sm_scale).to(DQ.dtype.element_ty),
                 mask=qo_mask)


@triton.jit
def _scaled_dot_product_attention_dropout_mask_kernel(Keep, Seed, dropout_p, numel, nq_nk,
                                                      BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = _dropout_keep(Seed, offs // nq_nk, (offs % nq_nk).to(tl.int32), dropout_p)
    tl.store(Keep + offs, keep.to(tl.uint8), mask=offs < numel)


# ----------------------------------------------------------------------------- launchers

def _block_d(D):
    return max(16, triton.next_power_of_2(D))


def _precision(dtype):
    # fp32 inputs: 3xTF32 keeps ~fp32 accuracy while still using tensor cores
    # (plain TF32 would lose 13 mantissa bits against torch's fp32 attention).
    return "tf32x3" if dtype == torch.float32 else "tf32"


# Tile configs, chosen with static_compile_specs (triton.compile for sm_80 / sm_90a) for
# no register spills in the light and the heaviest variant (fp32 bias + dropout + dbias)
# of every config: 128 query rows need 8 warps; fp32 inputs (3xTF32 splits every
# operand in two) and head dim 128 need the smallest tiles. ptxas's allocation is not
# monotonic in the tile size: the backward configs are measured points, not a rule.

def _fwd_config(Nq, block_d, dtype, offs64=False):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward kernel; ``offs64``: the
    64-bit-offset variant."""
    if dtype == torch.float32:
        return (16, 32, 4, 2) if Nq <= 16 or block_d >= 64 else (64, 32, 4, 2)
    if Nq <= 16:  # CaiT class attention (Nq = 1): the smallest tl.dot tile
        return 16, 64, 4, 2
    block_n = 32 if block_d == 128 else 64
    if offs64:  # (64-bit K / V tile offsets spill at 64 x 64 (d64), 64 x 32 (d128) on sm_80)
        block_n //= 2
    # ViT N = 197 / 577: 128 queries per program (8 warps); K/V tiles are reused from L2
    # by the two or five query blocks of a head, which run next to each other.
    return (64, block_n, 4, 2) if Nq <= 64 else (128, block_n, 8, 2)


def _dq_config(Nq, block_d, dtype, direct=False):
    """(BLOCK_M queries per program, BLOCK_N keys per step, num_warps, num_stages).
    Each program reads all of K and V once: the fewer query blocks, the less traffic.
    ``direct``: the variant storing dbias into the user-shaped (unaligned) rows."""
    if dtype == torch.float32:
        # (8 warps on a 16 x 16 tile: the only fp32 head-dim-128 point without spills)
        return (16, 16, 8, 1) if block_d == 128 else (16, 32, 4, 1)
    if Nq <= 16 or block_d == 128:
        return 16, 64, 4, 1
    # The unaligned dbias store tips the 64 x 32 tile into spills on sm_80 (d64: 255
    # registers, 4 spill stores); 16 keys per step fit (217) with the same query blocks,
    # hence the same K / V reads.
    return (64, 16, 4, 1) if direct else (64, 32, 4, 1)


def _dkdv_config(block_d, dtype):
    """(BLOCK_M queries per step, BLOCK_N keys per program, num_warps, num_stages) of the
    dk/dv kernel. Each program reads all of Q and dO once: the fewer key blocks, the
    less traffic."""
    if dtype == torch.float32:
        return (16, 16, 8, 1) if block_d == 128 else (16, 16, 4, 1)
    return (16, 32, 4, 1) if block_d == 128 else (16, 128, 8, 1)


def _bias_args(bias, like):
    """(tensor, strides, BIAS kind) for the kernels; a bool mask is read as bytes."""
    if bias is None:
        return like, (0, 0, 0, 0), BIAS_NONE
    if bias.dtype == torch.bool:
        return bias.view(torch.uint8), bias.stride(), BIAS_BOOL
    return bias, bias.stride(), BIAS_FLOAT


# Offsets within one batch element from this on need the kernels' OFFS64 variant
# (int64 row / key x stride products); the batch offsets are int64 in every variant,
# head-dim offsets int32 in every variant (the ops layer refuses larger ones).
_INT32_OFFSETS = 2 ** 31


def _offs64(*tensors):
    """Whether an offset within one batch element (all dims but the two batch dims, the
    4th and 3rd from last) of one of ``tensors`` reaches ``_INT32_OFFSETS``."""
    return any(sum((n - 1) * abs(st) for i, (n, st) in enumerate(zip(t.shape, t.stride()))
                   if i not in (t.dim() - 4, t.dim() - 3) and n > 0) >= _INT32_OFFSETS
               for t in tensors if t is not None)


def _check_inputs(q, k, v, bias):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v: expected 4-D (Z1, Z2, N, D) tensors, got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    Z1, Z2, Nq, D = q.shape
    Nk = k.shape[2]
    if tuple(k.shape) != (Z1, Z2, Nk, D) or tuple(v.shape) != (Z1, Z2, Nk, D):
        raise ValueError(f"k, v: expected shape ({Z1}, {Z2}, Nk, {D}), got "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"q: head dim must be <= {MAX_HEAD_DIM}, got {D}")
    if bias is not None and tuple(bias.shape) != (Z1, Z2, Nq, Nk):
        raise ValueError(f"bias: expected a ({Z1}, {Z2}, {Nq}, {Nk}) view, got {tuple(bias.shape)}")
    return Z1, Z2, Nq, Nk, D


def _check_seed(seed, device=None):
    """``seed``: a one-element int64 tensor, on ``device`` unless it is None."""
    if not (isinstance(seed, torch.Tensor) and seed.dtype == torch.int64
            and seed.numel() == 1 and device in (None, seed.device)):
        got = (f"a {seed.dtype} tensor of shape {tuple(seed.shape)} on {seed.device}"
               if isinstance(seed, torch.Tensor) else type(seed).__name__)
        where = "" if device is None else f" on {device}"
        raise ValueError(f"seed: expected a one-element int64 tensor{where}, got {got}")


def _dropout_args(dropout_p, seed, q, Nk):
    """(DROPOUT, the Seed tensor, p, 1 / (1 - p)). Without dropout no kernel reads Seed:
    q stands in for it (as for an absent bias)."""
    if dropout_p <= 0.0:
        return False, q, 0.0, 1.0
    Nq = q.shape[2]
    if Nq * Nk >= 2 ** 31:
        raise ValueError(f"dropout: Nq * Nk must be < 2**31, got {Nq} * {Nk}")
    _check_seed(seed, q.device)
    scale = 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)
    return True, seed, float(dropout_p), scale


@on_tensor_device
def scaled_dot_product_attention_fwd(q, k, v, bias, scale, dropout_p=0.0, seed=None):
    """Forward launcher: returns ``(out (Z1, Z2, Nq, D) in q's dtype, lse (Z1, Z2, Nq, 2)
    fp32)``, lse holding each row's max logit and log2 of its sum of exponentials (see
    the module docstring). ``seed``: with dropout, a one-element int64 tensor on q's
    device."""
    Z1, Z2, Nq, Nk, D = _check_inputs(q, k, v, bias)
    out = torch.empty((Z1, Z2, Nq, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((Z1, Z2, Nq, 2), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    block_d = _block_d(D)
    offs64 = _offs64(q, k, v, bias, out)
    block_m, block_n, warps, stages = _fwd_config(Nq, block_d, q.dtype, offs64)
    bias_t, bs, bias_kind = _bias_args(bias, q)
    use_dropout, seed, dropout_p, dropout_scale = _dropout_args(dropout_p, seed, q, Nk)
    grid = (triton.cdiv(Nq, block_m) * Z1 * Z2,)
    _scaled_dot_product_attention_fwd_kernel[grid](
        q, k, v, bias_t, out, lse,
        seed, float(scale), dropout_p, dropout_scale,
        *q.stride(), *k.stride(), *v.stride(), *bs, *out.stride(),
        Z2, Nq, Nk, D,
        BIAS=bias_kind, DROPOUT=use_dropout, PRECISION=_precision(q.dtype),
        OFFS64=offs64, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=warps, num_stages=stages, maxnreg=_MAXNREG)
    return out, lse


def _num_sms(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _DEFAULT_SMS


class _BatchPlan:
    """How a backward kernel walks the batch: NG groups (the batch dims the bias is not
    broadcast over) x ``splits`` chunks of ``chunk`` broadcast indices (NB in all)."""

    def __init__(self, Z1, Z2, bcast1=False, bcast2=False, blocks=1, device=None):
        self.bcast1, self.bcast2 = bcast1, bcast2
        self.nb = (Z1 if bcast1 else 1) * (Z2 if bcast2 else 1)
        self.ng = Z1 * Z2 // self.nb
        # Split the broadcast batch over programs until the GPU holds 2 per SM; each
        # split is one partial dbias in the fp32 buffer, so its size stays bounded.
        splits = 1 if self.nb == 1 else min(
            self.nb, max(1, triton.cdiv(2 * _num_sms(device), blocks * self.ng)))
        self.chunk = triton.cdiv(self.nb, splits)
        self.splits = triton.cdiv(self.nb, self.chunk)
        self.grid = (blocks * self.ng * self.splits,)

    def args(self):
        return self.ng, self.nb, self.chunk

    def flags(self):
        return dict(BCAST1=self.bcast1, BCAST2=self.bcast2)


@on_tensor_device
def scaled_dot_product_attention_bwd(dout, q, k, v, out, lse, bias, scale, dropout_p=0.0,
                                     seed=None, bias_requires_grad=False, grads=None):
    """Backward launcher: returns ``(dq, dk, dv, dbias)``: new contiguous tensors, or
    ``grads``, three tensors of the shapes of q, k, v (any strides, e.g. the slices of
    one packed qkv gradient), written in place.

    dbias is None unless ``bias_requires_grad``; then it has the bias view's
    non-broadcast shape (each dim with stride 0 and size > 1 reduced to 1), in the
    bias dtype.
    """
    Z1, Z2, Nq, Nk, D = _check_inputs(q, k, v, bias)
    if tuple(dout.shape) != (Z1, Z2, Nq, D) or tuple(out.shape) != (Z1, Z2, Nq, D):
        raise ValueError(f"dout, out: expected shape {(Z1, Z2, Nq, D)}, got "
                         f"{tuple(dout.shape)}, {tuple(out.shape)}")
    if lse.dtype != torch.float32 or tuple(lse.shape) != (Z1, Z2, Nq, 2) or \
            not lse.is_contiguous():
        raise ValueError(f"lse: expected a contiguous float32 ({Z1}, {Z2}, {Nq}, 2) tensor, "
                         f"got {lse.dtype} {tuple(lse.shape)} strides {lse.stride()}")
    if bias_requires_grad and (bias is None or bias.dtype == torch.bool):
        raise ValueError("bias_requires_grad: needs a float bias")
    dq, dk, dv = grads or (torch.empty_like(t, memory_format=torch.contiguous_format)
                           for t in (q, k, v))
    dbias = red_shape = None
    if bias_requires_grad:
        red_shape = tuple(1 if (st == 0 and n > 1) else n
                          for st, n in zip(bias.stride(), bias.shape))
    if dq.numel() == 0 or dk.numel() == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
        return dq, dk, dv, _zero_dbias(red_shape, bias)

    block_d = _block_d(D)
    bias_t, bs, bias_kind = _bias_args(bias, q)
    use_dropout, seed, dropout_p, dropout_scale = _dropout_args(dropout_p, seed, q, Nk)
    common = dict(BIAS=bias_kind, DROPOUT=use_dropout, PRECISION=_precision(q.dtype),
                  BLOCK_D=block_d)
    scalars = (seed, float(scale), dropout_p, dropout_scale)

    delta = torch.empty(lse.shape[:-1], device=q.device, dtype=torch.float32)
    _scaled_dot_product_attention_bwd_preprocess_kernel[(triton.cdiv(Nq, 64) * Z1 * Z2,)](
        out, dout, delta, *out.stride(), *dout.stride(), Z2, Nq, D,
        OFFS64=_offs64(out, dout), BLOCK_M=64, BLOCK_D=block_d, num_warps=4)

    dq_m, dq_n, dq_warps, dq_stages = _dq_config(Nq, block_d, q.dtype)
    kv_m, kv_n, kv_warps, kv_stages = _dkdv_config(block_d, q.dtype)
    num_m, num_n = triton.cdiv(Nq, dq_m), triton.cdiv(Nk, kv_n)
    dq_plan = _BatchPlan(Z1, Z2, blocks=num_m)
    kv_plan = _BatchPlan(Z1, Z2, blocks=num_n)
    column = tile = direct = False
    db_buf, db_strides = q, (0, 0, 0, 0, 0)
    # A bias constant along the keys (stride 0 on Nk, or a single key) has an exactly
    # zero gradient (softmax is shift-invariant): zeros, without a kernel.
    if bias_requires_grad and (bs[3] == 0 or Nk == 1):
        dbias = _zero_dbias(red_shape, bias)
    elif bias_requires_grad:
        bcast = dict(bcast1=bs[0] == 0 and Z1 > 1, bcast2=bs[1] == 0 and Z2 > 1, device=q.device)
        # One value per key (bias broadcast over the queries): reduced in registers by
        # the key-major kernel; else tiles, reduced by the query-major one.
        column = bs[2] == 0 and Nq > 1
        tile = not column
        if column:
            kv_plan = plan = _BatchPlan(Z1, Z2, blocks=num_n, **bcast)
        else:
            dq_plan = plan = _BatchPlan(Z1, Z2, blocks=num_m, **bcast)
        # A half-precision bias tile summed over one batch index only (no broadcast batch,
        # e.g. batch 1): the query-major kernel stores the gradient itself, in the bias
        # dtype, in its final shape (an fp32 one needs no cast, its buffer is the gradient
        # already). Its own tile config keeps the same query blocks (so the same plan).
        direct = tile and plan.nb == 1 and torch.float32 not in (q.dtype, bias.dtype)
        if direct:
            dq_m, dq_n, dq_warps, dq_stages = _dq_config(Nq, block_d, q.dtype, direct=True)
            db_buf = dbias = torch.empty(red_shape, device=q.device, dtype=bias.dtype)
            db_strides = (0,) + _reduced_strides(db_buf)
        else:
            # fp32 partial sums, one per split. Tiles are padded to whole blocks so that
            # the query-major kernel's read-add-write needs no mask.
            rows = 1 if column else num_m * dq_m
            cols = Nk if column else triton.cdiv(Nk, dq_n) * dq_n
            db_buf = torch.empty((plan.splits,) + red_shape[:2] + (rows, cols),
                                 device=q.device, dtype=torch.float32)
            db_strides = (db_buf.stride(0),) + _reduced_strides(db_buf)
    common["OFFS64"] = _offs64(q, k, v, bias, dout, dq, dk, dv,
                               db_buf if column or tile else None)

    _scaled_dot_product_attention_bwd_dkdv_kernel[kv_plan.grid](
        q, k, v, bias_t, dout, lse, delta, dk, dv, db_buf, *scalars,
        *q.stride(), *k.stride(), *v.stride(), *bs, *dout.stride(), *dk.stride(),
        *dv.stride(), *db_strides[:3], db_strides[4],
        Z2, Nq, Nk, D, *kv_plan.args(), DBIAS=column, **kv_plan.flags(), **common,
        BLOCK_M=kv_m, BLOCK_N=kv_n, num_warps=kv_warps, num_stages=kv_stages,
        maxnreg=_MAXNREG)
    if Nk == 1:
        # One key: softmax is the constant 1 (0 on a masked row), so the logits get an
        # exactly zero gradient, and so do q and k (the kernels' dS would be rounding
        # noise: delta comes from the output rounded to q's dtype).
        dq.zero_(), dk.zero_()
        return dq, dk, dv, dbias
    _scaled_dot_product_attention_bwd_dq_kernel[dq_plan.grid](
        q, k, v, bias_t, dout, lse, delta, dq, db_buf, *scalars,
        *q.stride(), *k.stride(), *v.stride(), *bs, *dout.stride(), *dq.stride(), *db_strides,
        Z2, Nq, Nk, D, *dq_plan.args(), DBIAS=tile, DBIAS_DIRECT=direct, **dq_plan.flags(),
        **common,
        BLOCK_M=dq_m, BLOCK_N=dq_n, num_warps=dq_warps, num_stages=dq_stages,
        maxnreg=_MAXNREG)
    if (column or tile) and not direct:
        # Fixed-order sum of the split partials: deterministic.
        db_buf = db_buf[..., :Nq, :Nk]
        dbias = (db_buf.sum(0) if db_buf.shape[0] > 1 else db_buf[0]).to(bias.dtype)
    return dq, dk, dv, dbias


def _reduced_strides(t):
    # Reduced dims have size 1: stride 0 lets the kernels index them with any z.
    return tuple(0 if n == 1 else st for st, n in zip(t.stride()[-4:], t.shape[-4:]))


def _zero_dbias(red_shape, bias):
    # Allocated zero-filled only where it is the answer: elsewhere the kernels' reduced
    # partials are the gradient, and a memset first would be one more write of it.
    return None if red_shape is None else torch.zeros(red_shape, device=bias.device,
                                                      dtype=bias.dtype)


@on_tensor_device
def dropout_keep_mask(seed, shape, dropout_p):
    """The kernels' dropout keep-mask (bool, True = keep) for a ``(*batch, Nq, Nk)`` attention
    and ``seed``, a one-element int64 tensor (the launchers' seed); on the seed's device."""
    _check_seed(seed)
    numel = math.prod(shape)
    keep = torch.empty(numel, device=seed.device, dtype=torch.uint8)
    block = 1024
    if numel:
        _scaled_dot_product_attention_dropout_mask_kernel[(triton.cdiv(numel, block),)](
            keep, seed, float(dropout_p), numel, shape[-2] * shape[-1], BLOCK=block)
    return keep.view(torch.bool).reshape(shape)



# ----------------------------------------------------------------------------- static compile

_SPEC_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_SPEC_BLOCK_D = (16, 32, 64, 128)
# Query lengths that reach every tile config of _fwd_config / _dq_config.
_SPEC_NQ = (1, 64, 197)
_FP32_POINTERS = ("Lse", "Delta")


def _spec(kernel, name, dtype, constexprs, warps, stages, pointers):
    """A static_compile_specs entry. Tensor args are the capitalised ones; the head-dim
    strides are the constexpr 1 the JIT specialises to for dense rows, and the other
    strides are multiples of 16 for the usual layouts (D and H * D multiples of 16)."""
    constexprs = dict(constexprs)
    constexprs.update({a: 1 for a in kernel.arg_names
                       if a.startswith("stride_") and a.endswith("d")})
    # Dense bias rows and the dbias buffer (allocated here) have unit key strides too.
    constexprs.update({a: 1 for a in ("stride_bn", "stride_dbn") if a in kernel.arg_names})
    sig = {}
    for arg in kernel.arg_names:
        if arg in constexprs:
            sig[arg] = "constexpr"
        elif arg[0].isupper() and arg not in ("Z2", "Nq", "Nk", "D", "NG", "NB", "B_CHUNK"):
            sig[arg] = pointers.get(arg, "*fp32" if arg in _FP32_POINTERS else "*" + dtype)
        elif arg in ("sm_scale", "dropout_p", "dropout_scale"):
            sig[arg] = "fp32"
        else:
            sig[arg] = "i32"
    # Head dims are multiples of 16 in practice (16 ... 128), and so are the row and
    # batch strides of q/k/v/out and of the padded fp32 dbias buffer; not the user's
    # bias, nor the dbias stored directly in its shape (its specs drop stride_db*).
    divisible = [a for a in sig if sig[a] == "i32" and (a == "D" or a.startswith("stride_"))
                 and not a.startswith("stride_b")]
    uses_dot = "BLOCK_N" in constexprs
    spec = {"name": name, "fn": kernel, "signature": sig, "constexprs": constexprs,
            "num_warps": warps, "num_stages": stages, "uses_dot": uses_dot,
            "dtype": dtype, "divisible_by_16": divisible}
    if uses_dot:  # the attention kernels are launched with this ptxas register cap
        spec["maxnreg"] = _MAXNREG
    return spec


def static_compile_specs():
    """Every (kernel, tile config, dtype, head-dim bucket) the launchers can pick, each
    in its lightest and its heaviest feature variant, the heaviest with 32-bit and with
    64-bit offsets (OFFS64).

    Bias kind, dropout and dbias are constexprs too; compiling all their combinations
    (~600 specs) is too slow for CI, so each config is compiled without them (the
    inference path) and with all of them at their costliest: an fp32 bias (wider loads
    than a half or bool one), dropout, and the dbias reduction with both batch dims
    broadcast. Every other variant adds a subset of that code to the light one.
    """
    specs = []
    for dtype, dname in _SPEC_DTYPES.items():
        precision = _precision(dtype)
        for block_d in _SPEC_BLOCK_D:
            for offs64 in (False, True):
                specs.append(_spec(
                    _scaled_dot_product_attention_bwd_preprocess_kernel,
                    f"sdpa_bwd_preprocess_d{block_d}{'_offs64' if offs64 else ''}_{dname}",
                    dname, dict(OFFS64=offs64, BLOCK_M=64, BLOCK_D=block_d), 4, 1, {}))
            for variant in ("light", "heavy", "heavy64"):
                heavy, offs64 = variant != "light", variant == "heavy64"
                tag = f"d{block_d}_{variant}_{dname}"
                common = dict(BIAS=BIAS_FLOAT if heavy else BIAS_NONE, DROPOUT=heavy,
                              PRECISION=precision, OFFS64=offs64, BLOCK_D=block_d)
                # (without dropout the launchers pass q for the unread Seed)
                pointers = {"Bias": "*fp32" if heavy else "*" + dname, "DBias": "*fp32",
                            "Seed": "*i64" if heavy else "*" + dname}
                for bm, bn, warps, stages in sorted({_fwd_config(nq, block_d, dtype, offs64)
                                                     for nq in _SPEC_NQ}):
                    specs.append(_spec(
                        _scaled_dot_product_attention_fwd_kernel,
                        f"sdpa_fwd_m{bm}n{bn}w{warps}_{tag}", dname,
                        dict(common, BLOCK_M=bm, BLOCK_N=bn), warps, stages, pointers))
                bcast = dict(BCAST1=heavy, BCAST2=heavy)
                for bm, bn, warps, stages in sorted({_dq_config(nq, block_d, dtype)
                                                     for nq in _SPEC_NQ}):
                    specs.append(_spec(
                        _scaled_dot_product_attention_bwd_dq_kernel,
                        f"sdpa_bwd_dq_m{bm}n{bn}w{warps}_{tag}", dname,
                        dict(common, **bcast, DBIAS=heavy, DBIAS_DIRECT=False, BLOCK_M=bm,
                             BLOCK_N=bn), warps, stages, pointers))
                if heavy and dtype != torch.float32:
                    # dbias stored directly (a half bias, no broadcast batch) into rows
                    # of the user's width: none of its strides is a multiple of 16.
                    for bm, bn, warps, stages in sorted({_dq_config(nq, block_d, dtype, True)
                                                         for nq in _SPEC_NQ}):
                        spec = _spec(
                            _scaled_dot_product_attention_bwd_dq_kernel,
                            f"sdpa_bwd_dq_m{bm}n{bn}w{warps}_d{block_d}_direct"
                            f"{'64' if offs64 else ''}_{dname}", dname,
                            dict(common, BCAST1=False, BCAST2=False, DBIAS=True,
                                 DBIAS_DIRECT=True, BLOCK_M=bm, BLOCK_N=bn),
                            warps, stages,
                            {"Bias": "*" + dname, "DBias": "*" + dname, "Seed": "*i64"})
                        spec["divisible_by_16"] = [a for a in spec["divisible_by_16"]
                                                   if not a.startswith("stride_db")]
                        specs.append(spec)
                bm, bn, warps, stages = _dkdv_config(block_d, dtype)
                specs.append(_spec(
                    _scaled_dot_product_attention_bwd_dkdv_kernel,
                    f"sdpa_bwd_dkdv_m{bm}n{bn}w{warps}_{tag}", dname,
                    dict(common, **bcast, DBIAS=heavy, BLOCK_M=bm, BLOCK_N=bn),
                    warps, stages, pointers))
    specs.append(_spec(_scaled_dot_product_attention_dropout_mask_kernel,
                       "sdpa_dropout_mask", "u8", dict(BLOCK=1024), 4, 1,
                       {"Keep": "*u8", "Seed": "*i64"}))
    return specs
