"""Memory traffic of each operator and pass at model shapes: fused vs naive vs compulsory.

    python benchmarks/traffic.py --json benchmarks/results/traffic.json

For every shape of the operator scripts, figures per image. The interpreter is slow, so
a shape is measured at batch 1, and the fused kernels run it cut down to ``--max-units``
heads (pooling: groups of 32 channels) where every head (channel) runs in programs of its
own, so that the bytes scale back exactly by the head count (``scale`` in the record;
``measured_shape`` says what ran):

- ``fused_bytes``: bytes the Triton kernels read and write, counted element by element
  in the Triton interpreter (``pyvit_ops.testing.traffic.count_fused_traffic``) while
  ``pyvit_ops.<op>(..., backend="triton")`` runs (fwd) and while ``.backward()`` runs (bwd),
  after one unmetered warm-up call: every access counts, as with no cache at all;
  ``fused_unique_bytes`` counts each kernel address once (a perfect cache), so the two
  bracket the DRAM traffic on a GPU. Both include ``fused_glue_bytes``: the aten ops
  that run around the kernels (buffers zero-filled, dtype casts, sums of partial
  results, copies), counted like the naive composition's ops;
- ``naive_bytes``: bytes the naive composition's aten ops read and write
  (``count_aten_traffic``, a dispatch mode), forward and backward likewise;
- ``compulsory_bytes``: every input read once and every output written once (bwd: the
  upstream gradient and the forward inputs the gradient depends on read (an op script's
  ``backward_reads``; all of them by default), the input gradients written);
- ``flops`` (and ``matmul_flops`` / ``other_flops``) and a modelled H100 time
  ``max(bytes / 3.35 TB/s, matmul FLOPs / 990 TFLOP/s, other FLOPs / 67 TFLOP/s)`` for
  naive and fused (``_cached``: with the perfect-cache bytes): a MODEL, not a measurement.
  Elementwise FLOPs get the FP32 CUDA-core peak because they do not run on tensor cores;
  the fused backward's recomputed products count on its side only. The naive model is
  optimistic for the naive side (one roofline over all its ops, no launch gaps).

The interpreter must be on before any kernel module is imported, so this runs in its own
process (``python -m benchmarks`` starts it). The target check is written beside the
JSON as ``<name>.targets.txt``.
"""
import argparse
import os
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks import harness, targets  # noqa: E402

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _enable_interpreter():
    loaded = [m for m in sys.modules if m.startswith("pyvit_ops.kernels")]
    from pyvit_ops.testing import interpreter

    if loaded and not interpreter.is_enabled():
        raise RuntimeError(f"kernel modules {loaded} were imported without TRITON_INTERPRET; "
                           "run traffic.py in a fresh process")
    interpreter.enable()


def model_time(nbytes, matmul, other):
    """Modelled H100 seconds of one pass (a roofline model, not a measurement)."""
    return max(nbytes / harness.H100_BANDWIDTH, matmul / harness.H100_TENSOR_FLOPS,
               other / harness.H100_FP32_FLOPS)


def _bytes(stats):
    return stats["read_bytes"] + stats["write_bytes"]


NOT_MEASURED = "fused path not measured (--naive-only: too slow in the interpreter here)"


def measure(module, shape, batch, dtype, max_units, log=print, fused=True):
    """Two records (fwd, bwd) for one shape; a failure of the fused path (or
    ``fused=False``) is recorded in ``error`` and the naive / compulsory figures are
    kept. The naive composition and the compulsory bytes are taken on the full shape;
    the interpreter runs the shape cut down to ``max_units`` heads where the op script's
    ``reduce`` says that scales exactly, and its bytes are scaled back. Everything is
    divided by the batch (per image)."""
    from pyvit_ops.testing import traffic

    start = time.perf_counter()
    inp = module.make_inputs(shape.params, batch, "cpu", dtype)
    reads = [t for t in inp.reads.values() if t is not None]
    out, stats = traffic.count_aten_traffic(module.naive, inp)
    dout = _dout(out)
    _, bwd_stats = traffic.count_aten_traffic(out.backward, dout)
    records = {}
    for p, s in (("fwd", stats), ("bwd", bwd_stats)):
        records[p] = {"op": module.OP, "model": shape.name, "pass": p,
                      "shape": module.describe(shape.params, batch), "params": shape.params,
                      "batch": batch, "dtype": str(dtype).replace("torch.", ""),
                      "naive_bytes": _bytes(s) / batch, "naive_read_bytes": s["read_bytes"] / batch,
                      "naive_write_bytes": s["write_bytes"] / batch,
                      **_op_summary(s["ops"], 1 / batch, "naive")}
    records["fwd"]["compulsory_bytes"] = (
        traffic.compulsory_bytes(reads, [out])["total_bytes"] / batch)
    needed = module.backward_reads(inp) if hasattr(module, "backward_reads") else reads
    records["bwd"]["compulsory_bytes"] = traffic.compulsory_bytes(
        [dout] + needed, [t for t in reads if t.requires_grad])["total_bytes"] / batch
    del out, inp, reads

    reduce = getattr(module, "reduce", None)
    measured, factor = reduce(shape.params, max_units) if reduce else (shape.params, 1.0)
    if not fused:
        for r in records.values():
            r["error"] = NOT_MEASURED
    else:
        try:
            _measure_fused(module, measured, batch, dtype, factor, records)
        except Exception as exc:  # an unsupported shape is a figure too: say why
            for r in records.values():
                r["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]

    flops = module.flops(shape.params, batch)
    for p, r in records.items():
        f = flops[p]
        r.update(flops=f.total / batch, matmul_flops=f.matmul / batch, other_flops=f.other / batch,
                 naive_over_compulsory=r["naive_bytes"] / r["compulsory_bytes"])
        r["model_h100_naive_s"] = model_time(r["naive_bytes"], f.matmul / batch, f.other / batch)
        if r.get("fused_bytes") is not None:
            r["fused_over_compulsory"] = r["fused_bytes"] / r["compulsory_bytes"]
            for suffix, key in (("", "fused_bytes"), ("_cached", "fused_unique_bytes")):
                fused = model_time(r[key], (f.matmul + f.recompute) / batch, f.other / batch)
                r[f"model_h100_fused{suffix}_s"] = fused
                r[f"model_h100_naive_over_fused{suffix}"] = r["model_h100_naive_s"] / fused
        r["seconds"] = round(time.perf_counter() - start, 2)
        log(_format(r))
    return list(records.values())


def _measure_fused(module, measured, batch, dtype, factor, records):
    """The fused figures of ``measure`` (shape ``measured``, bytes scaled by ``factor``),
    added to its records."""
    from pyvit_ops.testing import traffic

    per_image = factor / batch
    # Steady state, as in the timings: one warm-up call fills what a process computes
    # once per configuration (e.g. window attention's table-row pair index).
    warm = module.fused(module.make_inputs(measured, batch, "cpu", dtype))
    warm.backward(_dout(warm))
    small = module.make_inputs(measured, batch, "cpu", dtype)
    out, stats = traffic.count_fused_traffic(module.fused, small)
    _, bwd_stats = traffic.count_fused_traffic(out.backward, _dout(out))
    for p, s in (("fwd", stats), ("bwd", bwd_stats)):
        glue = s["glue"]
        records[p].update(measured_shape=module.describe(measured, batch), scale=factor,
                          fused_bytes=(_bytes(s) + _bytes(glue)) * per_image,
                          fused_read_bytes=(s["read_bytes"] + glue["read_bytes"]) * per_image,
                          fused_write_bytes=(s["write_bytes"] + glue["write_bytes"])
                          * per_image,
                          fused_unique_bytes=(s["unique_read_bytes"] + s["unique_write_bytes"]
                                              + _bytes(glue)) * per_image,
                          fused_glue_bytes=_bytes(glue) * per_image,
                          fused_launches=s["launches"],
                          **_op_summary(glue["ops"], per_image, "fused_glue"))
    if module.OP == "scaled_dot_product_attention":
        records["fwd"]["kv_reread"] = _kv_reread(small, stats["read_bytes"])


def _dout(out):
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)


def _op_summary(ops, per_image, prefix, top=5):
    """Number of aten calls and the ops that move the most bytes (scaled by ``per_image``)."""
    heavy = sorted(ops.items(), key=lambda kv: -(kv[1]["read_bytes"] + kv[1]["write_bytes"]))
    return {f"{prefix}_aten_calls": sum(e["calls"] for e in ops.values()),
            f"{prefix}_top_ops": {name: (e["read_bytes"] + e["write_bytes"]) * per_image
                                  for name, e in heavy[:top]}}


def _kv_reread(inp, read_bytes):
    """How many times the forward reads K and V, taking q and the bias as read once."""
    nbytes = {n: (t.numel() * t.element_size() if t is not None else 0)
              for n, t in inp.reads.items()}
    return (read_bytes - nbytes["q"] - nbytes["bias"]) / (nbytes["k"] + nbytes["v"])


def _format(r):
    def mb(key):
        value = r.get(key)
        return "      -" if value is None else f"{value / 2**20:7.2f}"
    ratio = r.get("fused_over_compulsory")
    model = r.get("model_h100_naive_over_fused")
    tail = r.get("error", "") or (f"fused/compulsory {ratio:5.2f}  naive/fused (H100 model) "
                                  f"x{model:5.2f}")
    return (f"  {r['op'][:14]:<14} {r['model']:<36} {r['pass']:<3} MB/img fused "
            f"{mb('fused_bytes')} naive {mb('naive_bytes')} compulsory {mb('compulsory_bytes')}"
            f"  {tail}  ({r['seconds']} s)")


class BeitTable:
    """BEiT-B's relative-position table at 224 px (N = 197, 12 heads, D = 64) as an op
    script of ``measure``: naive is timm's non-fused path (the (heads, N, N) bias gathered
    from the (T, heads) table by its index buffer, then the composition); fused, the
    table passed to ``scaled_dot_product_attention_qkvpacked`` and gathered in the
    kernels. Everything else is the SDPA script's."""

    GRID = (14, 14)

    def __init__(self):
        self.sdpa = harness.load_op("scaled_dot_product_attention")
        self.OP, self.reduce, self.flops = self.sdpa.OP, self.sdpa.reduce, self.sdpa.flops

    def model_shapes(self):
        return [harness.Shape("beit_b", "224.relpos_table",
                              dict(heads=12, nq=197, nk=197, dim=64, bias=False))]

    def tiny_shapes(self):
        return []

    def describe(self, params, batch):
        from pyvit_ops.reference.scaled_dot_product_attention import rel_pos_rows

        rows = rel_pos_rows(*self.GRID, 1)
        return self.sdpa.describe(params, batch) + f" table={rows}x{params['heads']}"

    def make_inputs(self, params, batch, device, dtype):
        from pyvit_ops.reference.scaled_dot_product_attention import (rel_pos_index,
                                                                      rel_pos_rows)

        inp = self.sdpa.make_inputs(params, batch, device, dtype)
        gen = torch.Generator(device=device).manual_seed(1)
        table = torch.randn(rel_pos_rows(*self.GRID, 1), params["heads"], generator=gen,
                            device=device).to(dtype).requires_grad_()
        inp.leaves["table"] = inp.reads["table"] = table
        inp.extra["index"] = rel_pos_index(self.GRID, params["nq"], device)
        return inp

    @staticmethod
    def naive(inp):
        n = inp.index.shape[0]
        bias = inp.table[inp.index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()
        attn = (inp.q * inp.scale) @ inp.k.transpose(-2, -1) + bias.unsqueeze(0)
        return attn.softmax(dim=-1) @ inp.v

    def fused(self, inp):
        return harness.pyvit_function(f"{self.OP}_qkvpacked")(
            inp.qkv, rel_pos_table=inp.table, rel_pos_grid=self.GRID, scale=inp.scale,
            backend="triton")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python benchmarks/traffic.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, help="write the records to this file")
    parser.add_argument("--ops", nargs="*", default=list(harness.OPS), choices=harness.OPS)
    parser.add_argument("--models", nargs="*", help="only shapes whose name starts with these")
    parser.add_argument("--batch", type=int, default=1,
                        help="images per measurement (figures are per image; default 1: the "
                             "interpreter is slow)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    parser.add_argument("--max-units", type=int, default=1,
                        help="heads measured per shape (pooling: groups of 32 channels); the "
                             "figures are scaled to the full shape (default 1)")
    parser.add_argument("--tiny", action="store_true", help="the scripts' tiny shapes (CI)")
    parser.add_argument("--naive-only", action="store_true",
                        help="naive and compulsory figures only; the records say the fused "
                             "path was not measured")
    args = parser.parse_args(argv)
    _enable_interpreter()
    start = time.perf_counter()
    records = []
    modules = [harness.load_op(op) for op in args.ops]
    if "scaled_dot_product_attention" in args.ops:
        modules.append(BeitTable())
    for module in modules:
        for shape in harness.selected_shapes(module, args.tiny, args.models):
            records += measure(module, shape, args.batch, _DTYPES[args.dtype], args.max_units,
                               fused=not args.naive_only)
    if set(args.ops) != set(harness.OPS) or args.models:  # a partial run
        records = harness.merge_records(args.json, records, ("op", "model", "pass"))
    lines = targets.traffic_lines(records)
    harness.write_records(args.json, records, lines)
    print("\n".join(lines))
    print(f"{len(records)} records in {time.perf_counter() - start:.0f} s -> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
