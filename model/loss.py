"""The training loss: full-softmax cross-entropy over every item without the [P, N] logits,
or sampled softmax with logQ correction for catalogs too big for it. `streamrec train` and
the continual learner (model/continual.py) fine-tune with the same loss."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from model.transformer import SeqRec

if TYPE_CHECKING:
    from model.train import TrainConfig


class ChunkedSoftmaxCE(torch.autograd.Function):
    """Mean full-softmax cross-entropy of h [P,D] against every row of M [N,D].

    Never materialises the [P,N] logits: forward keeps only log-sum-exp per row, backward
    recomputes logits in cache-sized row chunks. On 2 CPU cores this is ~2.8x faster than
    F.cross_entropy(h @ M.T) at the Video Games shape (allocation and memory traffic of the
    [P,N] buffers dominated), with the same gradients.

    The loss is nearly all of an epoch's time (~120 ms of a 128-sequence batch over 12k
    items), so its three matmuls may run in `compute` dtype: bf16 is ~3.5x faster where the
    CPU has AVX512-BF16 (or on CUDA). Log-sum-exp, the softmax and both gradient
    accumulators stay fp32.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, M: torch.Tensor, y: torch.Tensor, chunk: int,
                compute: torch.dtype = torch.float32) -> torch.Tensor:
        lse = torch.empty(h.shape[0], device=h.device, dtype=torch.float32)
        Mc = M.to(compute)
        for lo in range(0, h.shape[0], chunk):
            lse[lo: lo + chunk] = torch.logsumexp((h[lo: lo + chunk].to(compute) @ Mc.T).float(), 1)
        ctx.save_for_backward(h, M, y, lse)
        ctx.chunk, ctx.compute = chunk, compute
        return (lse - (h * M[y]).sum(-1).float()).mean()

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        h, M, y, lse = ctx.saved_tensors
        P, chunk, compute = h.shape[0], ctx.chunk, ctx.compute
        gh, gM = torch.empty_like(h), torch.zeros_like(M, dtype=torch.float32)
        Mc = M.to(compute)
        for lo in range(0, P, chunk):
            hc = h[lo: lo + chunk].to(compute)
            z = (hc @ Mc.T).float().sub_(lse[lo: lo + chunk, None]).exp_()
            z[torch.arange(z.shape[0], device=z.device), y[lo: lo + chunk]] -= 1.0
            z = z.mul_(g / P).to(compute)
            gh[lo: lo + chunk] = z @ Mc
            gM += z.T @ hc
        return gh, gM.to(M.dtype), None, None, None


def ce_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The loss matmuls' dtype: `auto` takes bf16 where it is fast (CUDA, or a CPU with BF16 instructions)."""
    if setting == "fp32" or (setting == "auto" and device.type == "cpu" and not _cpu_has_bf16()):
        return torch.float32
    return torch.bfloat16


def _cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and "avx512_bf16" in open("/proc/cpuinfo").read()
    except (OSError, RuntimeError, AttributeError):
        return False


def item_loss(model: SeqRec, h: torch.Tensor, y: torch.Tensor, tc: "TrainConfig",
              logq: torch.Tensor | None) -> torch.Tensor:
    """Mean loss of the hidden states `h` against next items `y`: full softmax, or sampled
    (`logq`: log sampling probability per item) with `tc.negatives` shared negatives."""
    M = model.item_matrix()
    if logq is None:  # row 0 is OOV/padding: never a class
        return ChunkedSoftmaxCE.apply(h, M[1:], y - 1, 64 if h.device.type == "cpu" else 4096,
                                      ce_dtype(tc.ce_dtype, h.device))
    neg = torch.multinomial(logq.exp(), tc.negatives, replacement=True)
    pos = (h * M[y]).sum(-1, keepdim=True) - logq[y][:, None]
    negl = h @ M[neg].T - logq[neg][None]
    negl = negl.masked_fill(neg[None] == y[:, None], float("-inf"))
    return F.cross_entropy(torch.cat([pos, negl], 1), torch.zeros_like(y))
