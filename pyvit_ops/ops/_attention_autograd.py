"""Autograd of the attention custom ops whose forward returns ``(out, lse)``: the
log-sum-exp is saved for the backward and gets no gradient of its own."""
import functools

import torch


def register(forward_ops, gradients):
    """Registers the autograd formula of each op of ``forward_ops``, pairs ``(op, tokens)``
    where ``tokens`` is how many leading inputs are token tensors (3: q, k, v; 1: qkv).

    ``gradients(dout, inputs, out, lse, tokens, needs)`` returns the inputs' gradients in
    input order (it may stop early); ``inputs`` are the forward's, tensors included, and
    the entries where ``needs`` is False are dropped here."""

    def setup_context(ctx, inputs, output, tokens):
        out, lse = output
        tensor = [isinstance(x, torch.Tensor) for x in inputs]
        ctx.tokens, ctx.tensor = tokens, tensor
        ctx.save_for_backward(*(x if t else None for x, t in zip(inputs, tensor)), out, lse)
        ctx.others = [None if t else x for x, t in zip(inputs, tensor)]
        ctx.mark_non_differentiable(lse)
        # No zeros for lse's gradient: autograd passes None.
        ctx.set_materialize_grads(False)

    def backward(ctx, dout, _dlse):
        need = ctx.needs_input_grad
        if dout is None:  # out got no gradient: none reaches the inputs
            return (None,) * len(need)
        *saved, out, lse = ctx.saved_tensors
        inputs = [s if t else o for s, o, t in zip(saved, ctx.others, ctx.tensor)]
        grads = gradients(dout, inputs, out, lse, ctx.tokens, need)
        grads = tuple(g if n else None for g, n in zip(grads, need))
        return grads + (None,) * (len(need) - len(grads))

    for op, tokens in forward_ops:
        op.register_autograd(backward, setup_context=functools.partial(setup_context,
                                                                       tokens=tokens))
