"""FlexRound's fused autograd function computes in place and, for wide layers, its backward pass by
blocks of rows (less memory at a large block's peak): outputs and gradients must be those of the
plain formulation bit for bit (same seed: same codes)."""

import pytest
import torch

from quantizer.rounding import flexround as fr


def _divided(w3, s1, log_S2, log_row, log_col):
    logs = log_S2 + log_row
    if log_col is not None:
        logs = logs + log_col
    return w3 / (s1 * logs.exp())


class _Plain(torch.autograd.Function):
    """The formulation before the in-place and row-block version."""

    @staticmethod
    def forward(ctx, w3, s1, log_S2, log_row, log_col, zero, qmax):
        v = _divided(w3, s1, log_S2, log_row, log_col)
        r = torch.round(v) + zero
        inside = (r >= 0) & (r <= qmax)
        qz = torch.clamp(r, 0, qmax) - zero
        ctx.save_for_backward(w3, s1, log_S2, log_row, log_col, inside, qz.to(torch.int8))
        return qz * s1

    @staticmethod
    def backward(ctx, g):
        w3, s1, log_S2, log_row, log_col, inside, qz = ctx.saved_tensors
        v = _divided(w3, s1, log_S2, log_row, log_col)
        glog = torch.where(inside, g, 0.0).mul_(v).mul_(-s1)

        def reduce_to(t, like):
            dims = [d for d in range(t.dim()) if like.shape[d] == 1 and t.shape[d] != 1]
            return t.sum(dim=dims, keepdim=True) if dims else t

        g_row = reduce_to(glog, torch.empty(glog.shape[0], 1, 1))
        g_col = glog.sum(dim=0, keepdim=True) if log_col is not None else None
        return None, reduce_to(g * qz, s1) + reduce_to(glog, s1) / s1, glog, g_row, g_col, None, None


SHAPES = [(96, 1, 256, False), (64, 4, 32, True), (33, 2, 48, True), (700, 1, 2048, False), (301, 4, 64, True),
          (200, 1, 96, False)]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("block", [4096, 1 << 20])
@pytest.mark.parametrize("n,groups,per_group,col", SHAPES)
def test_fused_function_matches_the_plain_one_bit_for_bit(n, groups, per_group, col, block, threads, monkeypatch):
    monkeypatch.setattr(fr, "_BACKWARD_BLOCK_ELEMENTS", block)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(n * 7 + per_group)
        w3 = torch.randn(n, groups, per_group, generator=g) * 0.02
        w3[0, :, : per_group // 2] *= 30  # codes clamped at both ends
        s1 = (w3.abs().amax(2, keepdim=True) / 7 + 1e-4).requires_grad_()
        log_S2 = (torch.randn(n, groups, per_group, generator=g) * 0.05).requires_grad_()
        log_row = (torch.randn(n, 1, 1, generator=g) * 0.05).requires_grad_()
        log_col = (torch.randn(1, groups, per_group, generator=g) * 0.05).requires_grad_() if col else None
        zero = torch.full((n, groups, 1), 8.0)
        upstream = torch.randn(n, groups, per_group, generator=g)
        leaves = [t for t in (s1, log_S2, log_row, log_col) if t is not None]
        outs = []
        for fn in (_Plain, fr._FlexRoundFn):
            for t in leaves:
                t.grad = None
            y = fn.apply(w3, s1, log_S2, log_row, log_col, zero, 15)
            y.backward(upstream)
            outs.append([y.detach().clone()] + [t.grad.clone() for t in leaves])
        assert all(torch.equal(a, b) for a, b in zip(*outs))
    finally:
        torch.set_num_threads(before)
