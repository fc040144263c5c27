"""Hand-written CPU training step for the PyTorch tutorial LeNet (no autograd, no graph building).

Each conv + 2x2 max-pool pair is one matmul with a "super-kernel".  The conv input is
split into its four 2x2 polyphase components (ry, rx), and the conv weight is scattered
into a (4*Cout, Cin*4*3*3 + 1) matrix whose rows are (dy, dx, o), i.e. (position in
the pooling window, out channel), and whose columns are (c, ry, rx, a, b) taps on the
polyphase grid plus a final bias column matched by a row of ones in the im2col matrix.
The four pooling candidates of every pooled pixel then come out as four contiguous
blocks, so pooling is a contiguous ``amax`` and the im2col reads long contiguous runs.
Strided elementwise ops and short-run copies are what make these tiny convolutions slow
on CPU, so the layouts avoid them at the price of some extra matmul work (structural
zeros in the super-kernels, a few garbage columns).

Layouts (B = batch size, M1 = B*14*16, M2 = 5*5*B):
  conv1 output (1+4, 6, M1):  block 0 is zero, then (dy, dx); cols (n, ph, pw), pw 14, 15 garbage
  conv2 output (1+4, 16, M2): block 0 is zero, then (dy, dx); cols (ph, pw, n)
Garbage columns always receive zero gradient, so they never reach the weights.
"""

from __future__ import annotations

import torch
from torch import nn

_K = 5
_A = _K // 2 + 1
_BODY_SHAPES = [(6, 3, 5, 5), (6,), (16, 6, 5, 5), (16,), (120, 400), (120,), (84, 120), (84,)]
_CONV_PARAMS = 456 + 2416  # conv1.weight, conv1.bias, conv2.weight, conv2.bias lead the flat buffer
_relu_bwd = torch.ops.aten.threshold_backward.grad_input
_nll_bwd = torch.ops.aten.nll_loss_backward.default


def _superkernel_index(cout: int, cin: int, w_off: int, b_off: int, zero: int, taps_first: bool) -> torch.Tensor:
    """Flat-buffer index of every entry of the (4*cout, cin*4*A*A + 1) super-kernel."""
    dy = torch.arange(2).view(2, 1, 1, 1, 1, 1, 1, 1)
    dx = torch.arange(2).view(1, 2, 1, 1, 1, 1, 1, 1)
    o = torch.arange(cout).view(1, 1, cout, 1, 1, 1, 1, 1)
    c = torch.arange(cin).view(1, 1, 1, cin, 1, 1, 1, 1)
    ry = torch.arange(2).view(1, 1, 1, 1, 2, 1, 1, 1)
    rx = torch.arange(2).view(1, 1, 1, 1, 1, 2, 1, 1)
    a = torch.arange(_A).view(1, 1, 1, 1, 1, 1, _A, 1)
    b = torch.arange(_A).view(1, 1, 1, 1, 1, 1, 1, _A)
    # input row 2*(ph + a) + ry must equal output row 2*ph + dy plus kernel row kh
    kh = 2 * a + ry - dy
    kw = 2 * b + rx - dx
    valid = (kh >= 0) & (kh < _K) & (kw >= 0) & (kw < _K)
    w_idx = w_off + ((o * cin + c) * _K + kh.clamp(0, _K - 1)) * _K + kw.clamp(0, _K - 1)
    idx = torch.where(valid, w_idx, torch.full_like(w_idx, zero))
    if taps_first:
        idx = idx.permute(0, 1, 2, 6, 7, 3, 4, 5)  # columns (a, b, c, ry, rx)
    idx = idx.reshape(4 * cout, cin * 4 * _A * _A)
    bias = (b_off + torch.arange(cout)).repeat(4).view(4 * cout, 1)
    return torch.cat([idx, bias], dim=1).contiguous()


def _gradsum_index(sk_index: torch.Tensor, n: int) -> torch.Tensor:
    """Positions of flat params 0..n-1 in the super-kernel index, as (4, n): one per pooling-window position."""
    pos = torch.argsort(sk_index, stable=True)
    out = pos[sk_index[pos] < n].view(n, 4)
    if not torch.equal(sk_index[out], torch.arange(n).view(n, 1).expand(n, 4)):
        raise AssertionError("super-kernel index is not a 4-fold cover of the conv parameters")
    return out.t().contiguous()


def _transposed_positions(rows: int, cols: int) -> torch.Tensor:
    """Where entry i of a row-major (rows, cols) matrix sits in the row-major storage of its transpose."""
    i = torch.arange(rows * cols)
    return (i % cols) * rows + i // cols


def _col2im_matrix() -> torch.Tensor:
    """0/1 matrix (7*7, A*A*5*5) adding conv2 super-im2col entries (a, b, ph, pw) back onto the 7x7 polyphase grid."""
    i = torch.arange(7).view(7, 1, 1, 1, 1, 1)
    j = torch.arange(7).view(1, 7, 1, 1, 1, 1)
    a = torch.arange(_A).view(1, 1, _A, 1, 1, 1)
    b = torch.arange(_A).view(1, 1, 1, _A, 1, 1)
    ph = torch.arange(5).view(1, 1, 1, 1, 5, 1)
    pw = torch.arange(5).view(1, 1, 1, 1, 1, 5)
    return ((ph + a == i) & (pw + b == j)).float().reshape(49, _A * _A * 25)


class _Workspace:
    """Preallocated buffers and strided views for one batch size."""

    def __init__(self, n: int, classes: int):
        """Allocate everything one step at batch size n with `classes` outputs needs."""
        self._conv1(n, n * 14 * 16)
        self._conv2(n, n * 14 * 16, 5 * 5 * n)
        self._fully_connected(n, classes)

    def _conv1(self, n: int, m1: int) -> None:
        """Buffers of conv1 + pool: polyphase input, its im2col, outputs and their gradients."""
        # polyphase planes (c, ry, rx, n, 16, 16); the zero tail absorbs the wide im2col over-read
        self.xp_store = torch.zeros(3 * 4 * n * 256 + 64)
        self.xp = self.xp_store[: 3 * 4 * n * 256].view(3, 2, 2, n, 16, 16)
        s = self.xp.stride()
        # (c, ry, rx, a, b, n, ph*16 + pw): one contiguous run of 224 per (row, n), pw 14, 15 being garbage
        self.xp_cols = self.xp_store.as_strided((3, 2, 2, _A, _A, n, 224), (s[0], s[1], s[2], 16, 1, 256, 1))
        self.cols1 = torch.empty(3 * 4 * _A * _A + 1, m1)  # (109, M1)
        self.cols1[-1].fill_(1.0)
        self.cols1_body = self.cols1[:-1].view(3, 2, 2, _A, _A, n, 224)
        # block 0 is a constant zero candidate: amax over all 5 blocks is relu(maxpool) in one op, and since
        # it comes first it wins ties at 0, exactly where relu's backward blocks the gradient
        self.y1 = torch.zeros(5, 6, m1)
        self.y1_conv = self.y1[1:].view(24, m1)
        self.p1 = torch.empty(6, m1)  # (c, n, 14, 16)
        self.e1 = torch.empty(5, 6 * m1)
        self.gy1 = torch.empty(4, 6, m1)
        self.gy1_t = self.gy1.view(24, m1).t()
        self.gp1 = torch.zeros(6, m1)  # garbage columns are never written and stay 0
        self.gp1_poly = self.gp1.as_strided((7, 7, n, 6, 2, 2), (32, 2, 224, m1, 16, 1))  # (i, j, n, c, ry, rx)

    def _conv2(self, n: int, m1: int, m2: int) -> None:
        """Buffers of conv2 + pool: the gather index of its im2col, outputs and their gradients."""
        a = torch.arange(_A).view(_A, 1, 1, 1, 1, 1, 1, 1)
        b = torch.arange(_A).view(1, _A, 1, 1, 1, 1, 1, 1)
        c = torch.arange(6).view(1, 1, 6, 1, 1, 1, 1, 1)
        ry = torch.arange(2).view(1, 1, 1, 2, 1, 1, 1, 1)
        rx = torch.arange(2).view(1, 1, 1, 1, 2, 1, 1, 1)
        ph = torch.arange(5).view(1, 1, 1, 1, 1, 5, 1, 1)
        pw = torch.arange(5).view(1, 1, 1, 1, 1, 1, 5, 1)
        nn_ = torch.arange(n).view(1, 1, 1, 1, 1, 1, 1, n)
        # conv2 super-im2col (a, b, c, ry, rx | ph, pw, n) gathered straight from p1: its 5-long runs are too
        # short for a fast strided copy
        self.cols2_idx = (c * m1 + nn_ * 224 + (2 * (ph + a) + ry) * 16 + 2 * (pw + b) + rx).reshape(-1).contiguous()
        self.cols2 = torch.empty(6 * 4 * _A * _A + 1, m2)  # (217, M2)
        self.cols2[-1].fill_(1.0)
        self.cols2_body = self.cols2[:-1].view(-1)
        self.y2 = torch.zeros(5, 16, m2)
        self.y2_conv = self.y2[1:].view(64, m2)
        self.p2 = torch.empty(16, m2)  # (c, ph, pw, n)
        self.p2_cnp = self.p2.view(16, 25, n).transpose(1, 2)
        self.e2 = torch.empty(5, 16 * m2)
        self.gy2 = torch.empty(4, 16, m2)
        self.gy2_mat = self.gy2.view(64, m2)
        self.gy2_t = self.gy2_mat.t().expand(_A * _A, m2, 64)
        self.gp2 = torch.empty(16, m2)
        self.gp2_cnp = self.gp2.view(16, 25, n).transpose(1, 2)
        self.g2cols = torch.empty(_A * _A, m2, 24)  # (a, b, ph, pw, n, c, ry, rx)
        self.g2cols_mat = self.g2cols.view(_A * _A * 25, n * 24)
        self.gp1_out = torch.empty(49, n * 24)  # (i, j, n, c, ry, rx)
        self.gp1_out6 = self.gp1_out.view(7, 7, n, 6, 2, 2)

    def _fully_connected(self, n: int, classes: int) -> None:
        """Buffers of fc1-fc3, the logits and their gradients."""
        self.h0 = torch.empty(n, 400)
        self.h1 = torch.empty(n, 120)
        self.h2 = torch.empty(n, 84)
        self.z = torch.empty(n, classes)
        self.gh2 = torch.empty(n, 84)
        self.gh1 = torch.empty(n, 120)
        self.gh0 = torch.empty(n, 400)
        # flatten(x, 1) order is (c, h, w) per sample
        self.h0_cnp = self.h0.view(n, 16, 25).transpose(0, 1)
        self.gh0_cnp = self.gh0.view(n, 16, 25).transpose(0, 1)
        self.ones = torch.ones(n)
        self.one = torch.tensor(1.0)
        self.total_weight = torch.tensor(float(n))


class TutorialSGDStep:
    """Fused CPU training step for the tutorial network: cross-entropy + SGD with momentum (torch.optim.SGD semantics, incl. weight_decay and the first-step buffer init), hand-written forward/backward."""

    def __init__(self, model: nn.Module, lr: float, momentum: float, weight_decay: float = 0.0):
        """Move the model's parameters into one flat buffer (params become views of it) and precompute index maps."""
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        named = list(model.named_parameters())
        shapes = [tuple(p.shape) for _, p in named]
        # fc3 is (classes, 84) and its bias (classes,): the only layer that depends on the dataset
        self.classes = shapes[-1][0] if len(shapes) == 10 and len(shapes[-1]) == 1 else 0
        if self.classes < 1 or shapes != _BODY_SHAPES + [(self.classes, 84), (self.classes,)]:
            raise ValueError("model does not have the tutorial LeNet parameter layout")
        self.names = [name for name, _ in named]
        sizes = [p.numel() for _, p in named]
        total = sum(sizes)
        # the trailing slot stays 0: the super-kernels gather their structural zeros from it
        self.flat = torch.zeros(total + 1)
        self.buf = torch.zeros(total + 1)
        offsets = []
        off = 0
        for (_, p), size in zip(named, sizes):
            self.flat[off:off + size].copy_(p.detach().reshape(-1))
            p.data = self.flat[off:off + size].view_as(p)
            offsets.append(off)
            off += size
        self.w = [self.flat[o:o + k].view(s) for o, k, s in zip(offsets, sizes, shapes)]
        self.m = [self.buf[o:o + k].view(s) for o, k, s in zip(offsets, sizes, shapes)]
        self.w_t = [w.t() if w.dim() == 2 else None for w in self.w]

        sk1_idx = _superkernel_index(6, 3, offsets[0], offsets[1], total, taps_first=False)  # (24, 109)
        sk2_idx = _superkernel_index(16, 6, offsets[2], offsets[3], total, taps_first=True)  # (64, 217)
        n1 = sk1_idx.numel()
        self.sk_idx = torch.cat([sk1_idx.view(-1), sk2_idx.view(-1)])
        self.sk = torch.empty(self.sk_idx.numel())
        self.sk1 = self.sk[:n1].view(sk1_idx.shape)
        self.sk2 = self.sk[n1:].view(sk2_idx.shape)
        # (a*b, 64, c*ry*rx) per-tap blocks; the bias column has no input gradient
        self.sk2_taps = self.sk2[:, :216].view(64, _A * _A, 24).transpose(0, 1)
        # super-kernel gradients are produced transposed, (cols, rows): that matmul form is the faster one
        self.gsk = torch.empty(self.sk_idx.numel())
        self.gsk1_t = self.gsk[:n1].view(sk1_idx.shape[1], sk1_idx.shape[0])
        self.gsk2_t = self.gsk[n1:].view(sk2_idx.shape[1], sk2_idx.shape[0])
        where = torch.cat([_transposed_positions(*sk1_idx.shape), n1 + _transposed_positions(*sk2_idx.shape)])
        self.gs_idx = where[_gradsum_index(self.sk_idx, _CONV_PARAMS)].reshape(-1).contiguous()
        self.gs = torch.empty(4, _CONV_PARAMS)
        self.m_conv = self.buf[:_CONV_PARAMS]
        self.ones4 = torch.ones(4)
        self.col2im = _col2im_matrix()  # (49, 225)
        # over the candidates (zero, (0,0), (0,1), (1,0), (1,1)), d_k = e_k - 2 * sum_{j<k} e_j is 1 exactly at the
        # first maximum and <= 0 elsewhere: max_pool2d's first-index tie breaking, with relu's backward folded in
        self.first = (torch.eye(5) - 2.0 * torch.tril(torch.ones(5, 5), diagonal=-1))[1:].contiguous()
        self._ws: dict[int, _Workspace] = {}

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Run one forward/backward/SGD update on batch (x, y) and return the detached mean loss."""
        if x.dim() != 4 or tuple(x.shape[1:]) != (3, 32, 32) or x.dtype != torch.float32 or x.device.type != "cpu":
            raise ValueError("x must be a float32 CPU tensor of shape (B, 3, 32, 32)")
        if y.shape != (x.shape[0],) or y.dtype != torch.int64:
            raise ValueError("y must be an int64 tensor of shape (B,)")
        with torch.no_grad():
            return self._step(x, y)

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward, backward and update without autograd; see the module docstring for the layouts."""
        n = x.shape[0]
        ws = self._ws.get(n)
        if ws is None:
            ws = self._ws[n] = _Workspace(n, self.classes)
        self._forward(ws, x, n)
        # the kernels F.cross_entropy and its autograd backward run, so the logits' gradient is bit-identical
        ls = torch._log_softmax(ws.z, 1, False)
        loss = torch._C._nn.nll_loss(ls, y, None, 1, -100)
        gls = _nll_bwd(ws.one, ls, y, None, 1, -100, ws.total_weight)
        self._backward(ws, torch._log_softmax_backward_data(gls, ls, 1, torch.float32))
        if self.weight_decay != 0.0:
            self.buf.add_(self.flat, alpha=self.weight_decay)
        self.flat.add_(self.buf, alpha=-self.lr)
        return loss

    def _forward(self, ws: _Workspace, x: torch.Tensor, n: int) -> None:
        """Logits of batch x into ws.z, keeping what the backward pass needs in ws."""
        w, wt = self.w, self.w_t
        sN, sC, sH, sW = x.stride()
        torch.index_select(self.flat, 0, self.sk_idx, out=self.sk)

        ws.xp.copy_(x.as_strided((3, 2, 2, n, 16, 16), (sC, sH, sW, sN, 2 * sH, 2 * sW)))
        ws.cols1_body.copy_(ws.xp_cols)
        torch.mm(self.sk1, ws.cols1, out=ws.y1_conv)
        torch.amax(ws.y1, dim=0, out=ws.p1)

        torch.index_select(ws.p1.view(-1), 0, ws.cols2_idx, out=ws.cols2_body)
        torch.mm(self.sk2, ws.cols2, out=ws.y2_conv)
        torch.amax(ws.y2, dim=0, out=ws.p2)

        ws.h0_cnp.copy_(ws.p2_cnp)
        torch.addmm(w[5], ws.h0, wt[4], out=ws.h1).relu_()
        torch.addmm(w[7], ws.h1, wt[6], out=ws.h2).relu_()
        torch.addmm(w[9], ws.h2, wt[8], out=ws.z)

    def _backward(self, ws: _Workspace, gz: torch.Tensor) -> None:
        """From the logits' gradient gz, the parameter gradients, folded into the momentum buffers:
        buf = momentum * buf + grad."""
        w, mb, mom = self.w, self.m, self.momentum
        mb[8].addmm_(gz.t(), ws.h2, beta=mom)
        mb[9].addmv_(gz.t(), ws.ones, beta=mom)
        torch.mm(gz, w[8], out=ws.gh2)
        _relu_bwd(ws.gh2, ws.h2, 0.0, grad_input=ws.gh2)
        mb[6].addmm_(ws.gh2.t(), ws.h1, beta=mom)
        mb[7].addmv_(ws.gh2.t(), ws.ones, beta=mom)
        torch.mm(ws.gh2, w[6], out=ws.gh1)
        _relu_bwd(ws.gh1, ws.h1, 0.0, grad_input=ws.gh1)
        mb[4].addmm_(ws.gh1.t(), ws.h0, beta=mom)
        mb[5].addmv_(ws.gh1.t(), ws.ones, beta=mom)
        torch.mm(ws.gh1, w[4], out=ws.gh0)

        ws.gp2_cnp.copy_(ws.gh0_cnp)
        self._pool_backward(ws.y2, ws.p2, ws.gp2, ws.e2, ws.gy2)
        torch.mm(ws.cols2, ws.gy2_mat.t(), out=self.gsk2_t)

        # grad wrt p1: per tap (a, b), gy2^T @ super-kernel block, then col2im onto the 7x7 polyphase grid
        torch.bmm(ws.gy2_t, self.sk2_taps, out=ws.g2cols)
        torch.mm(self.col2im, ws.g2cols_mat, out=ws.gp1_out)
        ws.gp1_poly.copy_(ws.gp1_out6)
        self._pool_backward(ws.y1, ws.p1, ws.gp1, ws.e1, ws.gy1)
        torch.mm(ws.cols1, ws.gy1_t, out=self.gsk1_t)

        # each conv parameter occurs once per pooling-window position in its super-kernel
        torch.index_select(self.gsk, 0, self.gs_idx, out=self.gs.view(-1))
        self.m_conv.addmv_(self.gs.t(), self.ones4, beta=mom)

    def _pool_backward(self, y, p, gp, e, gy):
        """Route gp (C, M) through relu and max-pool to the first maximum of each window of y (1+4, C, M)."""
        torch.eq(y, p, out=e.view(y.shape))
        torch.mm(self.first, e, out=gy.view(4, -1))
        _relu_bwd(gp, gy, 0.5, grad_input=gy)

    def momentum_buffers(self) -> dict[str, torch.Tensor]:
        """Momentum buffer copies by parameter name; all zeros (the initial state) means 'not yet initialised'."""
        return {name: m.clone() for name, m in zip(self.names, self.m)}

    def load_momentum_buffers(self, bufs: dict[str, torch.Tensor]) -> None:
        """Restore buffers from momentum_buffers() or torch.optim.SGD state; a missing or None entry means zeros."""
        for name, m in zip(self.names, self.m):
            src = bufs.get(name)
            if src is None:
                m.zero_()
            else:
                m.copy_(src)
