"""Reference talking-heads attention (CaiT's ``TalkingHeadAttn``): plain, differentiable
PyTorch, timm's arithmetic.

With ``L``, ``b_l`` the pre-softmax head mix (``proj_l``) and ``W``, ``b_w`` the
post-softmax one (``proj_w``), per batch element and query / key pair (i, j):

    S_g = sum_h L[g, h] scale q_h k_h^T + b_l[g],   P_g = softmax_j(S_g),
    A_f = sum_g W[f, g] P_g + b_w[f],               out_f = A_f v_f.
"""
import torch
import torch.nn.functional as F

HALF_DTYPES = (torch.float16, torch.bfloat16)


def talking_heads_attention(q, k, v, proj_l_weight, proj_l_bias, proj_w_weight, proj_w_bias,
                            *, scale, dropout_p=0.0, training=True):
    """``out_f = (sum_g W[f, g] softmax(sum_h L[g, h] scale q_h k_h^T + b_l[g]) + b_w[f]) v_f``.

    q, k, v: ``(B, H, N, D)``; the weights ``(H, H)``, the biases ``(H,)``. Half inputs
    are computed in float32 and the result is returned in q's dtype. ``dropout_p``
    drops entries of the mixed attention A as timm's ``attn_drop`` (when ``training``).
    """
    dtype = q.dtype
    compute = torch.float32 if dtype in HALF_DTYPES else dtype
    q, k, v = (t.to(compute) for t in (q, k, v))
    params = [t.to(compute) for t in (proj_l_weight, proj_l_bias, proj_w_weight, proj_w_bias)]
    attn = (q * scale) @ k.transpose(-2, -1)
    attn = F.linear(attn.permute(0, 2, 3, 1), params[0], params[1]).permute(0, 3, 1, 2)
    attn = attn.softmax(dim=-1)
    attn = F.linear(attn.permute(0, 2, 3, 1), params[2], params[3]).permute(0, 3, 1, 2)
    attn = F.dropout(attn, dropout_p, training)
    return (attn @ v).to(dtype)
