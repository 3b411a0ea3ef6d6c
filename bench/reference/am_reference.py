#!/usr/bin/python3
"""PyTorch reference of one tilt Adjoint Matching iteration: the comparison baseline of issue 5; and (--method) of
one iteration of Reinforce Adjoint Matching (BM_RamIteration), of Efficient Adjoint Matching on ODE or weighted SDE
endpoints (BM_EamIteration) and of buffered Adjoint Matching with or without weights (BM_BufferedIteration), written
the same way and checked against the C++ Trainer number by number.

The same iteration as bench/am_bench.cpp's BM_Iteration (the C++ Trainer::step on AdjointMatching; its
autograd path computes it the same way, its default taped path with the networks run once),
written as idiomatic, efficient PyTorch: rollout under no_grad, the lean adjoint backwards through the
frozen base by torch.autograd.grad (or, for the exact mixture base, the same closed-form VJP as
GaussianMixture::velocity_vjp), one batched forward of the residual network on all chosen steps,
backward, Adam. Same problems, networks, dtype (float32), batch, K, loss steps, loss weighting,
optimiser and thread count; with the same seeds it draws the same random numbers as the C++ code
(same generator, same order), so the two agree iteration by iteration up to float rounding.

Where it still differs from the C++ iteration (none changes the result beyond float rounding):
- Constants are cast to float32 once (the mixture's means, eigenvalues and log-weights, the reward's
  centre and matrix, the time-embedding frequencies); the C++ code casts or builds them on every call.
- Schedule values (alpha, beta, ...) of the exact mixture velocity are Python floats; the C++
  GmmVelocity computes them as 0-dim float32 tensors. Hence the 2-D numbers differ from C++'s in the
  6th-7th digit; the 64-D ones come out bit-identical.
- The regression skips what residual mode and "velocity" weighting make unnecessary: the C++ code also
  concatenates v_base of the chosen steps (unused there) and multiplies by a weight of ones.
- The gradient norm takes one .item() instead of one per parameter tensor.
- Timing: rollout and lean adjoint are timed inside each iteration; am_bench times them as separate
  benchmarks (BM_Rollout, BM_LeanAdjoint).
Only what am_bench uses is implemented: linear schedule, memoryless noise with offset h = 1/K, residual
fine-tuning (LoRA on the U-Net), lambda = 1, no loss clipping, no gradient clipping, constant lr.

A baseline for scripts/bench_compare.sh, not part of tilt; ctest reference_methods (check_methods.sh) runs
--check-methods against tilt_bench so that the two cannot drift apart.
Needs Debian's python3-torch (PyTorch 1.13) and runs with /usr/bin/python3.

  am_reference.py --problem 2d --threads 2          # timing: JSON with median ms per iteration
  am_reference.py --problem digits --method eam     # the same for EAM (am, ram, eam, eam_w, buf, buf_w)
  am_reference.py --check [--cpp-bench build/bench/tilt_bench]   # correctness checks, exit 1 on failure
  am_reference.py --check-methods --cpp-bench build/bench/tilt_bench   # only every method's first iterations
  am_reference.py --trace 20 --problem 2d            # loss / reward / grad norm per iteration (JSON lines)
  am_reference.py --problem unet --device cuda [--compile]   # the U-Net iteration on a GPU, eager or compiled
                                                            # (PyTorch 2.x there; scripts/device_check.sh runs it)
"""

import argparse
import json
import math
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

MASK64 = (1 << 64) - 1
LOG_2PI = math.log(2.0 * math.pi)


def mix_seed(seed, stream):
    """splitmix64 of (seed, stream), as tilt::mix_seed: iteration i draws from its own generator."""
    z = (seed + 0x9E3779B97F4A7C15 * (stream + 1)) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def make_generator(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


# ---------------------------------------------------------------------------------------------------
# Linear schedule (alpha = t, beta = 1 - t) and the memoryless noise schedule with offset h
# (src/schedule/*.cpp): sigma^2 = 2 eta_h, drift b = c_v v - c_x x with c_v = 2, c_x = kappa_h.

def schedule(t):
    """alpha, beta, alpha', beta' of the linear schedule."""
    return t, 1.0 - t, 1.0, -1.0


def eta_h(t, h):
    al, be, dal, dbe = schedule(t)
    wronskian = dal * be - al * dbe
    inverse = (al + h * dal) / (wronskian * (be + h * abs(dbe)))
    return math.inf if inverse == 0.0 else 1.0 / inverse


def kappa_h(t, h):
    al, _, dal, _ = schedule(t)
    return dal / (al + h * dal)


class MemorylessNoise:
    def __init__(self, h):
        self.h = h

    def sigma(self, t):
        return math.sqrt(2.0 * eta_h(t, self.h))

    def coefficients(self, t):
        """(c_v, c_x) of the drift b = c_v v - c_x x."""
        return 2.0, kappa_h(t, self.h)


# ---------------------------------------------------------------------------------------------------
# Velocity fields. velocity(x, t) with t a Python float (one time for the whole batch) or a [N, 1]
# tensor (one time per row); vjp(x, t, a) returns ((dv/dx)^T a, v).

class AutogradVjp(nn.Module):
    """A network velocity field whose VJP is autograd's: vjp(x, t, a) = ((dv/dx)^T a, v)."""

    def vjp(self, x, t, a):
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            v = self(xg, t)
            (g,) = torch.autograd.grad(v, xg, a)
        return g, v.detach()


class MlpVelocity(AutogradVjp):
    """src/model/mlp.cpp: input [x, t, sin(pi f t), cos(pi f t) for f = 1..n/2], Linear + SiLU layers,
    weights uniform(+-1/sqrt(fan_in)) drawn from a generator seeded with `seed` (weight, then bias, per
    layer); the last layer zero for a residual network."""

    def __init__(self, dim, hidden, time_features=16, zero_output=False, seed=0):
        super().__init__()
        self.dim = dim
        gen = make_generator(seed)
        layers = []
        fan_in = dim + 1 + time_features
        widths = list(hidden) + [dim]
        with torch.no_grad():
            for i, width in enumerate(widths):
                layer = nn.Linear(fan_in, width)
                bound = 1.0 / math.sqrt(fan_in)
                last = i + 1 == len(widths)
                if last and zero_output:
                    layer.weight.zero_()
                    layer.bias.zero_()
                else:
                    layer.weight.uniform_(-bound, bound, generator=gen)
                    layer.bias.uniform_(-bound, bound, generator=gen)
                layers.append(layer)
                if not last:
                    layers.append(nn.SiLU())
                fan_in = width
        self.net = nn.Sequential(*layers)
        self.register_buffer("freqs", torch.arange(1, time_features // 2 + 1, dtype=torch.float32) * math.pi)

    def forward(self, x, t):
        if not torch.is_tensor(t):
            t = torch.full((x.shape[0], 1), t, dtype=x.dtype)
        arg = t * self.freqs
        return self.net(torch.cat([x, t, torch.sin(arg), torch.cos(arg)], 1))

    velocity = forward


class GmmVelocity:
    """src/model/gmm.cpp: the exact velocity of the linear-schedule marginal of a Gaussian mixture
    sum_k w_k N(mu_k, Sigma_k), with components first ([K, B, d]) and Sigma_k = U_k diag(lam_k) U_k^T;
    rotations skipped when every Sigma_k is diagonal. Constants are cast to x's dtype once, here."""

    def __init__(self, weights, means, covariances, dtype=torch.float32):
        w = weights.double() / weights.double().sum()
        covariances = covariances.double()
        self.dim = means.shape[1]
        self.diagonal = bool(torch.equal(covariances, torch.diag_embed(torch.diagonal(covariances, 0, 1, 2))))
        if self.diagonal:
            lam, U = torch.diagonal(covariances, 0, 1, 2), None
        else:
            lam, U = torch.linalg.eigh(covariances)
        self.log_w = torch.log(w).to(dtype).unsqueeze(1)           # [K, 1]
        self.mu = means.to(dtype).unsqueeze(1)                      # [K, 1, d]
        self.lam = lam.to(dtype).unsqueeze(1)                       # [K, 1, d]
        self.U = None if U is None else U.to(dtype)                 # [K, d, d]
        self.Ut = None if U is None else self.U.transpose(1, 2).contiguous()

    def _parts(self, x, t):
        al, be, _, _ = schedule(t)
        diff = x.unsqueeze(0) - al * self.mu                        # [K, B, d]
        y = diff if self.diagonal else torch.bmm(diff, self.U)      # U_k^T (x - alpha mu_k)
        var = (al * al) * self.lam + be * be                        # [K, 1, d]
        log_n = -0.5 * (y * y / var + torch.log(var)).sum(-1) - 0.5 * self.dim * LOG_2PI
        joint = log_n + self.log_w                                  # [K, B]
        log_p = torch.logsumexp(joint, 0)
        return y, var, joint - log_p, log_p

    def log_prob(self, x, t):
        """log p_t(x); only for the checks."""
        return self._parts(x, t)[3]

    def score(self, x):
        """grad log p_1(x), the mixture's own score (t = 1): sum_k gamma_k (-Sigma_k^{-1} (x - mu_k))."""
        y, var, log_post, _ = self._parts(x, 1.0)
        s = torch.exp(log_post).unsqueeze(-1) * (-y / var)
        return s.sum(0) if self.diagonal else torch.bmm(s, self.Ut).sum(0)

    def velocity(self, x, t):
        al, be, dal, dbe = schedule(t)
        y, var, log_post, _ = self._parts(x, t)
        coef = (dal * al * self.lam + dbe * be) / var               # [K, 1, d]
        lin = coef * y if self.diagonal else torch.bmm(coef * y, self.Ut)
        v_k = dal * self.mu + lin
        return (torch.exp(log_post).unsqueeze(-1) * v_k).sum(0)

    def vjp(self, x, t, a):
        """Closed form, as GaussianMixture::velocity_vjp:
        (dv/dx)^T a = sum_k gamma_k [M_k a - (a.v_k - a.v) C_k^{-1} (x - alpha mu_k)]."""
        al, be, dal, dbe = schedule(t)
        y, var, log_post, _ = self._parts(x, t)
        coef = (dal * al * self.lam + dbe * be) / var
        a_rot = a.unsqueeze(0) if self.diagonal else torch.matmul(a.unsqueeze(0), self.U)
        gamma = torch.exp(log_post)                                 # [K, B]
        cy = coef * y
        a_vk = (dal * self.mu * a.unsqueeze(0) + a_rot * cy).sum(-1)  # [K, B]
        a_v = (gamma * a_vk).sum(0, keepdim=True)
        inner = gamma.unsqueeze(-1) * (coef * a_rot - (a_vk - a_v).unsqueeze(-1) * (y / var))
        lin = cy if self.diagonal else torch.bmm(cy, self.Ut)
        v = (gamma.unsqueeze(-1) * (dal * self.mu + lin)).sum(0)
        g = inner.sum(0) if self.diagonal else torch.bmm(inner, self.Ut).sum(0)
        return g, v


class UNetVelocity(AutogradVjp):
    """src/model/unet.cpp (tilt's docs/equations.md, E124) with UNetOptions' defaults: 1 x 28 x 28 images, 32 base
    channels x (1, 2, 2), 2 residual blocks per level, GroupNorm(8), 32 time features, unconditional, no attention.
    Weights in the C++ layer order: convolutions and linear layers uniform(+-1/sqrt(fan_in)) from a generator seeded
    with `seed` (weight, then bias), GroupNorm scale 1 and shift 0. With `lora` = (rank, alpha, seed): adapters
    W + (alpha / rank) B A on every convolution and linear layer (E125), A drawn the same way in the same order, B = 0;
    the network's own weights frozen."""

    def __init__(self, seed, channels=1, height=28, width=28, base=32, mult=(1, 2, 2), blocks=2, groups=8,
                 time_features=32, dtype=torch.float32):
        super().__init__()
        self.c, self.h, self.w, self.groups, self.time_features = channels, height, width, groups, time_features
        self.dim = channels * height * width
        self.layers = []  # (name, kind, shape info) in the C++ order
        E = 4 * base
        self._linear("time.0", time_features, E)
        self._linear("time.1", E, E)
        self._conv("input", channels, base, 3, 1)
        skips, ch = [], base
        self.down = []
        for l, m in enumerate(mult):
            out = base * m
            level = []
            for b in range(blocks):
                level.append(self._block(f"down.{l}.{b}", ch, out, E))
                ch = out
                skips.append(ch)
            self.down.append((level, self._conv(f"down.{l}.downsample", ch, ch, 3, 2) if l + 1 < len(mult) else None))
        self.mid = [self._block("mid.0", ch, ch, E), self._block("mid.1", ch, ch, E)]
        self.up = []
        for l in reversed(range(len(mult))):
            out = base * mult[l]
            level = []
            for b in range(blocks):
                level.append(self._block(f"up.{l}.{b}", ch + skips.pop(), out, E))
                ch = out
            self.up.append((level, self._conv(f"up.{l}.upsample", ch, ch, 3, 1) if l > 0 else None))
        self.out_norm = self._norm("output.norm", ch)
        self.out_conv = self._conv("output.conv", ch, channels, 3, 1)
        gen = make_generator(seed)
        self.weights = {}
        self.kinds = {name: kind for name, kind, _, _ in self.layers}
        with torch.no_grad():
            for name, kind, shape, fan_in in self.layers:
                if kind == "norm":
                    w, b = torch.ones(shape[0], dtype=dtype), torch.zeros(shape[0], dtype=dtype)
                else:
                    bound = 1.0 / math.sqrt(fan_in)
                    w = torch.empty(shape, dtype=dtype).uniform_(-bound, bound, generator=gen)
                    b = torch.empty(shape[0], dtype=dtype).uniform_(-bound, bound, generator=gen)
                self.weights[name] = (nn.Parameter(w), nn.Parameter(b))
        for i, (name, _, _, _) in enumerate(self.layers):
            self.register_parameter(f"w{i}", self.weights[name][0])
            self.register_parameter(f"b{i}", self.weights[name][1])
        self.adapters, self.scale = {}, 0.0

    def _linear(self, name, fan_in, out):
        self.layers.append((name, "linear", (out, fan_in), fan_in))
        return name

    def _conv(self, name, fan_in, out, kernel, stride):
        self.layers.append((name, f"conv{stride}", (out, fan_in, kernel, kernel), fan_in * kernel * kernel))
        return name

    def _norm(self, name, ch):
        self.layers.append((name, "norm", (ch,), 0))
        return name

    def _block(self, name, cin, cout, E):
        names = (self._norm(name + ".norm1", cin), self._conv(name + ".conv1", cin, cout, 3, 1),
                 self._linear(name + ".emb", E, cout), self._norm(name + ".norm2", cout),
                 self._conv(name + ".conv2", cout, cout, 3, 1))
        return names + ((self._conv(name + ".skip", cin, cout, 1, 1),) if cin != cout else (None,))

    def add_lora(self, rank, alpha, seed):
        """Freezes the network and adds zero-initialised adapters; the adapters are the parameters() after it."""
        gen = make_generator(seed)
        self.scale = alpha / rank
        dtype = self.weights["input"][0].dtype
        with torch.no_grad():
            for p in list(self.parameters()):
                p.requires_grad_(False)
            for i, (name, kind, shape, fan_in) in enumerate(self.layers):
                if kind == "norm":
                    continue
                bound = 1.0 / math.sqrt(fan_in)
                a = nn.Parameter(torch.empty(rank, fan_in).uniform_(-bound, bound, generator=gen).to(dtype))
                b = nn.Parameter(torch.zeros(shape[0], rank, dtype=dtype))
                self.adapters[name] = (a, b)
                self.register_parameter(f"a{i}", a)
                self.register_parameter(f"bb{i}", b)

    def to_device(self, device):
        """Every parameter (adapters included) onto `device`, each the same Parameter object as before."""
        with torch.no_grad():
            for p in self.parameters():
                p.data = p.data.to(device)
        return self

    def trainable(self):
        if self.adapters:
            return [p for ab in self.adapters.values() for p in ab]
        return [p for p in self.parameters() if p.requires_grad]

    def _weight(self, name):
        w = self.weights[name][0]
        if name in self.adapters:
            a, b = self.adapters[name]
            w = w + (self.scale * (b @ a)).view(w.shape)
        return w

    # How a layer with adapters computes: "merged" (the weight W + (alpha / r) B A, one product) or "adapter"
    # (W x + (alpha / r) B (A x), three products: what peft's LoRA layers do unless merged). The same function.
    lora_form = "merged"

    def _layer(self, name, x):
        kind = self.kinds[name]
        if kind == "norm":
            w, b = self.weights[name]
            return torch.nn.functional.group_norm(x, self.groups, w, b, 1e-5)
        adapter = self.lora_form == "adapter" and name in self.adapters
        w = self.weights[name][0] if adapter else self._weight(name)  # W alone: the adapter runs beside it
        b = self.weights[name][1]
        if kind == "linear":
            out = torch.nn.functional.linear(x, w, b)
            if adapter:
                a, bb = self.adapters[name]
                out = out + torch.nn.functional.linear(torch.nn.functional.linear(x, a) * self.scale, bb)
            return out
        k, stride = w.shape[-1], int(kind[4:])
        out = torch.nn.functional.conv2d(x, w, b, stride, k // 2)
        if adapter:
            a, bb = self.adapters[name]
            low = torch.nn.functional.conv2d(x, a.view(a.shape[0], *w.shape[1:]), None, stride, k // 2)
            out = out + torch.nn.functional.conv2d(low * self.scale, bb.view(w.shape[0], a.shape[0], 1, 1))
        return out

    def _res(self, names, x, emb):
        n1, c1, e, n2, c2, skip = names
        silu = torch.nn.functional.silu
        h = self._layer(c1, silu(self._layer(n1, x)))
        h = h + self._layer(e, emb).unsqueeze(-1).unsqueeze(-1)
        h = self._layer(c2, silu(self._layer(n2, h)))
        return h + (self._layer(skip, x) if skip else x)

    def forward(self, x, t):
        if not torch.is_tensor(t):
            t = torch.full((x.shape[0], 1), t, dtype=x.dtype, device=x.device)
        return self.network(x, t)

    def compile(self):
        """The network under torch.compile (PyTorch 2.x), times passed as tensors so that each step's time is not
        compiled as a constant."""
        self.network = torch.compile(self.network)
        return self

    def network(self, x, t):
        B = x.shape[0]
        half = self.time_features // 2
        freq = torch.exp(math.log(1000.0) * (1.0 - torch.arange(half, dtype=x.dtype, device=x.device) / half))
        arg = t.reshape(-1, 1).expand(B, 1) * freq.unsqueeze(0)
        silu = torch.nn.functional.silu
        emb = self._layer("time.1", silu(self._layer("time.0", torch.cat([torch.sin(arg), torch.cos(arg)], 1))))
        emb = silu(emb)
        h = self._layer("input", x.reshape(B, self.c, self.h, self.w))
        skips = []
        for level, down in self.down:
            for names in level:
                h = self._res(names, h, emb)
                skips.append(h)
            if down:
                h = self._layer(down, h)
        for names in self.mid:
            h = self._res(names, h, emb)
        for level, up in self.up:
            for names in level:
                h = self._res(names, torch.cat([h, skips.pop()], 1), emb)
            if up:
                h = self._layer(up, torch.nn.functional.interpolate(h, scale_factor=2, mode="nearest"))
        h = self._layer("output.conv", silu(self._layer("output.norm", h)))
        return h.reshape(B, self.dim)

    velocity = forward


class Lora:
    """FineTunedVelocity in mode "lora" (src/model/velocity.cpp): the adapted U-Net is the model; its difference
    from the frozen base is v_lora - v_base."""

    def __init__(self, base_seed, lora_seed, rank=4, alpha=4.0, dtype=torch.float32):
        self.base = UNetVelocity(base_seed, dtype=dtype).requires_grad_(False)
        self.adapted = UNetVelocity(base_seed, dtype=dtype)
        self.adapted.add_lora(rank, alpha, lora_seed)
        self.dim = self.base.dim

    def to_device(self, device):
        self.base.to_device(device)
        self.adapted.to_device(device)
        return self

    def compile(self):
        self.base.compile()
        self.adapted.compile()
        return self

    def velocity(self, x, t):
        return self.adapted(x, t)

    def delta(self, x, t, v_base):
        return self.adapted(x, t) - v_base

    def trainable(self):
        return self.adapted.trainable()


class Residual(nn.Module):
    """v_theta = v_base + r_theta (src/model/velocity.cpp, residual mode); the base is frozen."""

    def __init__(self, base, net):
        super().__init__()
        self.base = base
        self.net = net
        if isinstance(base, nn.Module):
            base.requires_grad_(False)

    @property
    def dim(self):
        return self.net.dim

    def to_device(self, device):
        self.base.to_device(device)
        self.net.to_device(device)
        return self

    def compile(self):
        self.base.compile()
        self.net.compile()
        return self

    def velocity(self, x, t):
        return self.base.velocity(x, t) + self.net(x, t)

    def delta(self, x, t, v_base=None):
        """v_theta - v_base: the residual network's output (v_base is not needed)."""
        return self.net(x, t)

    def trainable(self):
        return list(self.net.parameters())


class QuadraticReward:
    """r(x) = -1/2 (x - c)^T A (x - c)."""

    def __init__(self, center, A, dtype=torch.float32):
        self.c = center.to(dtype)
        self.A = A.to(dtype)

    def to_device(self, device):
        self.c, self.A = self.c.to(device), self.A.to(device)
        return self

    def value(self, x):
        r = x - self.c
        return -0.5 * (r * (r @ self.A)).sum(1)

    def grad(self, x):
        return -((x - self.c) @ self.A)


class ClassifierReward:
    """src/model/classifier.cpp: r(x) = log p(c | x) of an MLP classifier (Linear + SiLU body, linear
    head), weights uniform(+-1/sqrt(fan_in)) from a generator seeded with `seed` (weight, then bias, per
    layer, body first); the gradient by autograd, as ClassifierReward::grad."""

    def __init__(self, dim, hidden, classes, target, seed, dtype=torch.float32):
        gen = make_generator(seed)
        layers, fan_in = [], dim
        with torch.no_grad():
            for width in list(hidden) + [classes]:
                layer = nn.Linear(fan_in, width)
                bound = 1.0 / math.sqrt(fan_in)
                layer.weight.uniform_(-bound, bound, generator=gen)
                layer.bias.uniform_(-bound, bound, generator=gen)
                layers += [layer, nn.SiLU()]
                fan_in = width
        self.net = nn.Sequential(*layers[:-1]).to(dtype).requires_grad_(False)
        self.target = target

    def value(self, x):
        return torch.log_softmax(self.net(x), 1)[:, self.target]

    def grad(self, x):
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.value(xg).sum(), xg)
        return g


# ---------------------------------------------------------------------------------------------------
# The problems of bench/am_bench.cpp: make_setup's three, and unet_setup's U-Net with LoRA.

DEFAULT_BATCH = {"2d": 256, "64d": 256, "digits": 64, "unet": 8, "unet_residual": 8}
LABELS = {"2d": "2-D demo, K=60", "64d": "64-D MLP, K=40", "digits": "digits model, K=40",
          "unet": "U-Net 28x28 LoRA rank 4, B=8 K=10", "unet_residual": "U-Net 28x28 residual U-Net, B=8 K=10"}


def make_problem(name, batch=None, dtype=torch.float32, device="cpu", compile=False):
    batch = batch or DEFAULT_BATCH.get(name, 256)
    if (device != "cpu" or compile) and name not in ("unet", "unet_residual"):
        raise SystemExit(f"--device and --compile are for the U-Net problems (unet, unet_residual), not '{name}'")
    if compile and not hasattr(torch, "compile"):
        raise SystemExit(f"--compile needs PyTorch 2.x (torch.compile); this is PyTorch {torch.__version__}")
    d2 = torch.float64
    residual_hidden = None
    if name == "2d":
        angles = [2 * math.pi * k / 8 for k in range(8)]
        means = torch.tensor([[3.0 * math.cos(a), 3.0 * math.sin(a)] for a in angles], dtype=d2)
        covariances = 0.25 * torch.eye(2, dtype=d2).expand(8, 2, 2).clone()
        base = GmmVelocity(torch.ones(8, dtype=d2), means, covariances, dtype)
        # EAM's grad log p_base at the data end: exact for a mixture, in float64 as GaussianMixture::score.
        exact = GmmVelocity(torch.ones(8, dtype=d2), means, covariances, d2)
        base_score = lambda x: exact.score(x.to(d2)).to(x.dtype)  # noqa: E731
        reward = QuadraticReward(torch.tensor([2.5, 0.0], dtype=d2), 0.25 * torch.eye(2, dtype=d2), dtype)
        K, early, late, hidden = 60, 20, 10, [128, 128, 128]
        dim = 2
    elif name == "64d":
        dim = 64
        base = MlpVelocity(dim, [256, 256, 256], 16, zero_output=False, seed=1).to(dtype)
        reward = QuadraticReward(torch.ones(dim, dtype=d2), 0.25 * torch.eye(dim, dtype=d2), dtype)
        K, early, late, hidden = 40, 10, 10, [256, 256, 256]
    elif name == "digits":
        dim = 64
        base = MlpVelocity(dim, [256, 256, 256], 16, zero_output=False, seed=1).to(dtype)
        reward = ClassifierReward(dim, [256, 64], 10, 3, seed=3, dtype=dtype)
        K, early, late, hidden = 40, 10, 10, [256, 256]
    elif name == "unet":
        # bench/am_bench.cpp's unet_setup(lora, 8, 10): an untrained U-Net base (seed 1), LoRA rank 4, alpha 4
        # (seed 2), a quadratic reward, K = 10, loss steps K/4 + K/4.
        model = Lora(1, 2, dtype=dtype).to_device(device)
        reward = QuadraticReward(torch.zeros(model.dim, dtype=d2), 0.1 * torch.eye(model.dim, dtype=d2), dtype)
        if compile:
            model.compile()
        am = AdjointMatching(model, reward.to_device(device), MemorylessNoise(0.1), 10, batch, 2, 2, dtype=dtype,
                             device=device)
        am.base_score = lambda x: blurred_data_end_score(model.base, x, DEFAULT_SCORE_TIME)  # noqa: E731
        return am
    elif name == "unet_residual":
        # bench/am_bench.cpp's unet_setup(residual, 8, 10), for timing: the U-Net base (seed 1) plus a second U-Net
        # (seed 2) whose output convolution starts at zero, as make_finetuned builds it; the same reward, K and loss
        # steps. The rollout runs both networks and the lean adjoint runs the base again (forward and backward) at
        # every step, as a PyTorch user writes it.
        net = UNetVelocity(2, dtype=dtype)
        with torch.no_grad():
            for p in net.weights["output.conv"]:
                p.zero_()
        model = Residual(UNetVelocity(1, dtype=dtype), net).to_device(device)
        reward = QuadraticReward(torch.zeros(model.dim, dtype=d2), 0.1 * torch.eye(model.dim, dtype=d2), dtype)
        if compile:
            model.compile()
        return AdjointMatching(model, reward.to_device(device), MemorylessNoise(0.1), 10, batch, 2, 2, dtype=dtype,
                               device=device)
    else:
        raise SystemExit(f"unknown problem '{name}' (valid: 2d, 64d, digits, unet, unet_residual)")
    if name != "2d":
        base_score = lambda x: blurred_data_end_score(base, x, DEFAULT_SCORE_TIME)  # noqa: E731
    net = MlpVelocity(dim, hidden, 16, zero_output=True, seed=2).to(dtype)
    model = Residual(base, net)
    am = AdjointMatching(model, reward, MemorylessNoise(1.0 / K), K, batch, early, late, dtype=dtype)
    am.base_score = base_score
    return am


METHODS = ("am", "ram", "eam", "eam_w", "buf", "buf_w")


def make_method(name, method, batch=None, dtype=torch.float32, device="cpu", compile=False):
    """Problem `name`'s iteration of `method`: Adjoint Matching as BM_Iteration, RAM as BM_RamIteration, EAM on ODE
    endpoints (eam) or weighted SDE endpoints (eam_w) as BM_EamIteration, the buffers (buf, buf_w) as
    BM_BufferedIteration: the same model, reward, batch, K and lambda, every other option at its C++ default."""
    am = make_problem(name, batch, dtype, device, compile)
    if method == "am":
        return am
    if device != "cpu" or compile:
        raise SystemExit("--device and --compile time Adjoint Matching (--method am) only")
    if method == "ram":
        return ReinforceAdjointMatching(am.model, am.reward, am.K, am.batch, am.lam, dtype=dtype)
    if method in ("eam", "eam_w"):
        return EfficientAdjointMatching(am.model, am.reward, am.base_score, am.K, am.batch, am.lam,
                                        path_weights=method == "eam_w", dtype=dtype)
    if method in ("buf", "buf_w"):
        return BufferedAdjointMatching(am, weights="future" if method == "buf_w" else "none")
    raise SystemExit(f"unknown method '{method}' (valid: {', '.join(METHODS)})")


# ---------------------------------------------------------------------------------------------------
# Adjoint Matching (src/train/adjoint_matching.cpp), with the options am_bench sets:
# lambda = 1, no clipping, loss_weighting = "velocity", final noiseless step.

class AdjointMatching:
    def __init__(self, model, reward, noise, K, batch, early, late, lam=1.0, weighting="velocity",
                 dtype=torch.float32, device="cpu"):
        self.model, self.reward, self.noise = model, reward, noise
        self.device = torch.device(device)  # the random draws stay on the CPU generator, as tilt's
        self.K, self.batch, self.early, self.late, self.lam = K, batch, early, late, lam
        self.dtype = dtype
        self.t = [k / K for k in range(K)] + [1.0]
        self.h = [self.t[k + 1] - self.t[k] for k in range(K)]
        self.coef = [noise.coefficients(t) for t in self.t[:K]]
        self.sigma = [noise.sigma(t) for t in self.t[:K]]
        exact = MemorylessNoise(0.0)
        # v_theta - v_base is regressed onto -rho_k a_k, rho = sigma^2 / c_v of the exact schedule (= eta_t);
        # steps with an infinite rho (t = 0) are left out.
        self.rho = [exact.sigma(t) ** 2 / 2.0 for t in self.t[:K]]  # c_v = 2 (memoryless)
        self.candidates = [k for k in range(K) if math.isfinite(self.rho[k])]
        assert early + late <= len(self.candidates)
        assert weighting == "velocity", "only the weighting am_bench uses (every term weighted 1)"

    def parameters(self):
        return self.model.trainable()

    @torch.no_grad()
    def rollout(self, gen, record=None):
        """X_0..X_{K-1} of the fine-tuned SDE (X_K is not needed with the noiseless final step); with a dict
        `record`, its "xi" and "v" get each step's draw and v_theta(X_k, t_k)."""
        x = torch.randn(self.batch, self.model.dim, generator=gen, dtype=self.dtype).to(self.device)
        xs = [x]
        for k in range(self.K - 1):
            c_v, c_x = self.coef[k]
            v = self.model.velocity(x, self.t[k])
            x = x + self.h[k] * (c_v * v - c_x * x)
            xi = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
            x = x + (math.sqrt(self.h[k]) * self.sigma[k]) * xi
            xs.append(x)
            if record is not None:
                record.setdefault("xi", []).append(xi)
                record.setdefault("v", []).append(v)
        return xs

    @torch.no_grad()
    def lean_adjoint(self, xs):
        """a_K = -lambda grad r(X^_1), X^_1 = X_{K-1} + h v_base(X_{K-1}); then backwards
        a_k = a_{k+1} + h_k (grad_x b_base(X_k, t_k))^T a_{k+1}. Returns a[0..K], v_base[0..K-1], X^_1."""
        K, base = self.K, self.model.base
        a = [None] * (K + 1)
        v_base = [None] * K
        k = K - 1
        h = self.h[k]
        with torch.enable_grad():   # the last step by autograd, as lean_adjoint() in C++
            xg = xs[k].detach().requires_grad_(True)
            v = base.velocity(xg, self.t[k])
            x1 = (xs[k] + h * v).detach()
            a[K] = -self.lam * self.reward.grad(x1)
            (vjp,) = torch.autograd.grad(v, xg, a[K])
        a[k] = a[K] + h * vjp
        v_base[k] = v.detach()
        for k in range(K - 2, -1, -1):
            c_v, c_x = self.coef[k]
            vjp, v_base[k] = base.vjp(xs[k], self.t[k], a[k + 1])
            a[k] = a[k + 1] + self.h[k] * (c_v * vjp - c_x * a[k + 1])
        return a, v_base, x1

    def loss_steps(self, gen):
        """The last `late` candidate steps always, `early` drawn without replacement from the others."""
        first_late = len(self.candidates) - self.late
        steps = self.candidates[first_late:]
        if self.early > 0 and first_late > 0:
            perm = torch.randperm(first_late, generator=gen).tolist()
            steps += [self.candidates[i] for i in perm[:min(self.early, first_late)]]
        return sorted(steps)

    def regression(self, xs, a, x1, gen, steps=None, weights=None, v_base=None):
        """Loss sum over the chosen steps of |v_theta - v_base + rho_k a_k|^2 (times weights[k] per row when
        given), batch mean, all (step, sample) pairs in one forward pass of the trainable network."""
        steps = self.loss_steps(gen) if steps is None else steps
        B = xs[0].shape[0]
        x = torch.cat([xs[k] for k in steps])
        t = torch.tensor([self.t[k] for k in steps], dtype=self.dtype, device=x.device)
        t = t.repeat_interleave(B).unsqueeze(1)
        target = torch.cat([self.rho[k] * a[k] for k in steps])
        vb = None if isinstance(self.model, Residual) else torch.cat([v_base[k] for k in steps])
        residual = self.model.delta(x, t, vb) + target
        terms = residual.pow(2).sum(1)
        if weights is not None:
            terms = terms * torch.cat([weights[k] for k in steps])
        loss = terms.sum() / B
        with torch.no_grad():
            metrics = {
                "reward": self.reward.value(x1).mean().item(),
                "loss_unclipped": terms.sum().item() / B,
                "clipped_fraction": 0.0,
                "adjoint_norm_t0": a[0].norm(dim=1).mean().item(),
            }
        return loss, metrics


class BufferedAdjointMatching:
    """src/train/buffered_adjoint_matching.cpp (tilt's docs/equations.md, E126-E127) as BM_BufferedIteration sets it
    up: a refill simulates size = 4 B trajectories and their lean adjoints at once (Adjoint Matching's rollout and
    adjoint with batch 4 B) and draws `passes` = 4 permutations of them; each iteration regresses on the next B rows,
    the terms at step k weighted ("future") by B softmax(log dQ_theta/dQ_old of the path after t_k), or not ("none")."""

    def __init__(self, am, passes=4, weights="future", size=None):
        self.am, self.passes, self.weights = am, passes, weights
        self.B, self.K = am.batch, am.K
        self.size = size or 4 * am.batch
        self.refill_every = self.size // self.B * passes
        self.iteration = 0

    @property
    def batch(self):
        return self.B

    def parameters(self):
        return self.am.parameters()

    def refill(self, gen):
        am = self.am
        am.batch = self.size
        record = {}
        try:
            xs = am.rollout(gen, record if self.weights == "future" else None)
            a, v_base, x1 = am.lean_adjoint(xs)
        finally:
            am.batch = self.B
        self.buffer = {"x": xs, "a": a, "v_base": v_base, "x1": x1, **record}
        self.order = torch.cat([torch.randperm(self.size, generator=gen) for _ in range(self.passes)])

    @torch.no_grad()
    def future_weights(self, rows, first_step):
        """weights[k] for k >= first_step: B softmax over the rows of the accumulated log dQ_theta/dQ_old of steps
        k..K-2 (the steps with noise), d_j = h c_v (v_old - v_theta) / std_j."""
        am, B = self.am, self.B
        weights = [None] * len(rows["x"])
        log_w = torch.zeros(B, dtype=torch.float64)
        for k in range(len(rows["x"]) - 1, first_step - 1, -1):
            if k < len(rows["xi"]):
                c_v, _ = am.coef[k]
                current = rows["v_base"][k] + am.model.delta(rows["x"][k], am.t[k], rows["v_base"][k])
                d = (am.h[k] * c_v * (rows["v"][k] - current)).double() / (math.sqrt(am.h[k]) * am.sigma[k])
                log_w = log_w - (d * rows["xi"][k].double()).sum(1) - 0.5 * (d * d).sum(1)
            weights[k] = (B * torch.softmax(log_w, 0)).to(am.dtype)
        return weights

    def compute(self, gen, phases):
        t0 = time.perf_counter()
        j = self.iteration % self.refill_every
        if j == 0:
            self.refill(gen)
        index = self.order[j * self.B:(j + 1) * self.B]
        rows = {key: [v.index_select(0, index) for v in value] if isinstance(value, list) else value.index_select(0, index)
                for key, value in self.buffer.items()}
        steps = self.am.loss_steps(gen)
        weights = self.future_weights(rows, steps[0]) if self.weights == "future" else None
        phases["endpoints"] = time.perf_counter() - t0
        self.iteration += 1
        return self.am.regression(rows["x"], rows["a"], rows["x1"], gen, steps, weights, rows["v_base"])


# ---------------------------------------------------------------------------------------------------
# Reinforce and Efficient Adjoint Matching (src/train/reinforce_adjoint_matching.cpp,
# src/train/efficient_adjoint_matching.cpp; tilt's docs/equations.md, E128 and E132), with the options
# BM_RamIteration and BM_EamIteration set: B endpoints, M = 4 noisings each, t ~ U[0, 1], residual fine-tuning.

DEFAULT_SCORE_TIME = 0.95  # tilt::kDefaultScoreTime


def blurred_data_end_score(base, x, tau):
    """EAM's grad log p_base at the data end for a base that is not a mixture (E133): the score of the base blurred
    by beta/alpha, read off the velocity at time tau from v = kappa x + eta s (linear schedule, W = 1)."""
    al, be, dal, dbe = schedule(tau)
    wronskian = dal * be - al * dbe
    v = base.velocity(al * x, tau)
    return (al * al / (be * wronskian)) * (v - dal * x)


class NoisedEndpoints:
    """What RAM and EAM share: B endpoints from the model's K-step Euler flow ODE, and M noisings of each drawn as
    in pretraining (t ~ U[0, 1] [N], then X_0 ~ N(0, I) [N, d]; x_t = alpha_t x_1 + beta_t X_0), endpoint-major."""

    def __init__(self, model, reward, K, batch, lam, noise_draws=4, dtype=torch.float32):
        self.model, self.reward, self.K, self.batch, self.lam = model, reward, K, batch, lam
        self.M, self.dtype = noise_draws, dtype

    def ode_endpoints(self, gen):
        x = torch.randn(self.batch, self.model.dim, generator=gen, dtype=self.dtype)
        h = 1.0 / self.K
        for k in range(self.K):
            x = x + h * self.model.velocity(x, k / self.K)
        return x

    def noisings(self, x1, gen):
        t = torch.rand(x1.shape[0], generator=gen, dtype=self.dtype)
        x0 = torch.randn(x1.shape, generator=gen, dtype=self.dtype)
        al, be, _, _ = schedule(t.unsqueeze(1))
        return t.unsqueeze(1), x0, al * x1 + be * x0


class ReinforceAdjointMatching(NoisedEndpoints):
    """RAM (E128): regression of the residual r_theta(x_t, t) onto lambda (r - b) (u - v_base(x_t, t)), u = alpha' x_1 +
    beta' X_0, with b the leave-one-out mean of the batch's rewards plus a critic V(x_t, t) (an MLP 2x64, 8 time
    features, zero output, seed 7) trained on the same rows onto r - mean."""

    def __init__(self, model, reward, K, batch, lam, noise_draws=4, critic_hidden=(64, 64), critic_seed=7,
                 dtype=torch.float32):
        super().__init__(model, reward, K, batch, lam, noise_draws, dtype)
        self.critic = MlpVelocity(model.dim, critic_hidden, 8, zero_output=True, seed=critic_seed).to(dtype)

    def parameters(self):
        return self.model.trainable() + list(self.critic.parameters())

    def compute(self, gen, phases):
        t0 = time.perf_counter()
        with torch.no_grad():
            x1 = self.ode_endpoints(gen)
            r = self.reward.value(x1)
        phases["endpoints"] = time.perf_counter() - t0
        B, M = self.batch, self.M
        mean_r = (r.sum() - r) / (B - 1)
        x1r, rr, mr = x1.repeat_interleave(M, 0), r.repeat_interleave(M, 0), mean_r.repeat_interleave(M, 0)
        t, x0, xt = self.noisings(x1r, gen)
        V = self.critic(xt, t).mean(1)
        c = rr - (mr + V.detach())
        with torch.no_grad():
            vb = self.model.base.velocity(xt, t)
        _, _, dal, dbe = schedule(t)
        target = self.lam * c.unsqueeze(1) * (dal * x1r + dbe * x0 - vb)
        critic_loss = (rr - mr - V).pow(2).mean()
        loss = (self.model.delta(xt, t, vb) - target).pow(2).sum(1).mean() + critic_loss
        return loss, {"reward": r.double().mean().item(), "reward_std": r.double().std(unbiased=False).item(),
                      "critic_loss": critic_loss.item()}


class EfficientAdjointMatching(NoisedEndpoints):
    """EAM (E131-E134): the closed-form adjoint of the linear reference; the regression of v_theta(x_t, t) onto
    v_ref(x_t) + (beta_t W_t / D_t) (G + x_1), D = alpha^2 + beta^2, G = lambda grad r(x_1) + grad log p_base(x_1).
    Endpoints from the model's ODE, or (path_weights) from its memoryless SDE with self-normalised path weights w,
    the rows with t < weights_until weighted B w_b."""

    def __init__(self, model, reward, base_score, K, batch, lam, noise_draws=4, path_weights=False,
                 weights_until=0.5, dtype=torch.float32):
        super().__init__(model, reward, K, batch, lam, noise_draws, dtype)
        self.base_score, self.path_weights, self.weights_until = base_score, path_weights, weights_until
        self.noise = MemorylessNoise(1.0 / K)

    def parameters(self):
        return self.model.trainable()

    def weighted_endpoints(self, gen):
        """tilt_rollout (src/train/unified_losses.cpp): K Euler-Maruyama steps of the model's memoryless SDE and
        log dP*/dQ = lambda r(X_1) - sum_k [d_k . xi_k + |d_k|^2 / 2], d_k = h c_v (v_theta - v_base) / std_k."""
        x = torch.randn(self.batch, self.model.dim, generator=gen, dtype=self.dtype)
        log_w = torch.zeros(self.batch, dtype=torch.float64)
        h = 1.0 / self.K
        for k in range(self.K):
            t = k / self.K
            vb = self.model.base.velocity(x, t)
            delta = self.model.delta(x, t, vb)
            c_v, c_x = self.noise.coefficients(t)
            std = math.sqrt(h) * self.noise.sigma(t)
            xi = torch.randn(x.shape, generator=gen, dtype=x.dtype)
            d = (h * c_v * delta).double() / std
            log_w = log_w - (d * xi.double()).sum(1) - 0.5 * (d * d).sum(1)
            x = (1.0 - h * c_x) * x + (h * c_v) * (vb + delta) + std * xi
        return x, log_w + self.lam * self.reward.value(x).double()

    def compute(self, gen, phases):
        t0 = time.perf_counter()
        w = None
        with torch.no_grad():
            if self.path_weights:
                x1, log_w = self.weighted_endpoints(gen)
                w = torch.softmax(log_w, 0).to(self.dtype)
            else:
                x1 = self.ode_endpoints(gen)
            r = self.reward.value(x1)
            G = self.lam * self.reward.grad(x1) + self.base_score(x1)
        phases["endpoints"] = time.perf_counter() - t0
        B, M = self.batch, self.M
        x1r, Gr = x1.repeat_interleave(M, 0), G.repeat_interleave(M, 0)
        t, x0, xt = self.noisings(x1r, gen)
        al, be, dal, dbe = schedule(t)
        D = al * al + be * be
        target = ((al * dal + be * dbe) / D) * xt + (be * (dal * be - al * dbe) / D) * (Gr + x1r)
        rows = (self.model.velocity(xt, t) - target).pow(2).sum(1)
        metrics = {}
        if w is not None:
            early = (t.squeeze(1) < self.weights_until).to(rows.dtype)
            loss = ((early * (B * w.repeat_interleave(M, 0)) + (1.0 - early)) * rows).mean()
            metrics["ess"] = 1.0 / (B * (w.double() ** 2).sum().item())
        else:
            loss = rows.mean()
        metrics.update({"reward": r.double().mean().item(), "reward_std": r.double().std(unbiased=False).item(),
                        "score_gap": (G + x1).pow(2).sum(1).mean().item()})
        return loss, metrics


class Trainer:
    """src/train/trainer.cpp with am_bench's options: Adam (lr 2e-5, betas (0.95, 0.999), eps 1e-8,
    weight decay 1e-2 as L2), constant lr, no gradient clipping, seed 0, the NaN guards and grad norm."""

    def __init__(self, am, lr=2e-5, betas=(0.95, 0.999), eps=1e-8, weight_decay=1e-2, seed=0):
        self.am = am
        self.params = am.parameters()
        self.opt = torch.optim.Adam(self.params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.seed = seed
        self.iteration = 0
        device = getattr(am, "device", torch.device("cpu"))
        # On a GPU the phases' clocks wait for the kernels queued before them.
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(self, times=None):
        """One iteration; appends its phases' seconds (a dict) to `times`."""
        t0 = time.perf_counter()
        gen = make_generator(mix_seed(self.seed, self.iteration))
        phases = {}
        if isinstance(self.am, AdjointMatching):
            xs = self.am.rollout(gen)
            self.sync()
            t1 = time.perf_counter()
            a, v_base, x1 = self.am.lean_adjoint(xs)
            self.sync()
            t2 = time.perf_counter()
            phases.update(rollout=t1 - t0, lean_adjoint=t2 - t1)
            loss, metrics = self.am.regression(xs, a, x1, gen, v_base=v_base)
        else:
            loss, metrics = self.am.compute(gen, phases)
            t2 = t0 + phases["endpoints"]
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"iteration {self.iteration + 1}: loss is {value}")
        self.opt.zero_grad()
        loss.backward()
        grad_norm = torch.stack([p.grad.pow(2).sum() for p in self.params]).sum().sqrt().item()
        if not math.isfinite(grad_norm):
            raise FloatingPointError(f"iteration {self.iteration + 1}: gradient is not finite")
        self.opt.step()
        self.iteration += 1
        self.sync()
        t3 = time.perf_counter()
        if times is not None:
            phases.update(regression=t3 - t2, iteration=t3 - t0)
            times.append(phases)
        return {"iteration": self.iteration, "loss": value, "grad_norm": grad_norm, **metrics}


# ---------------------------------------------------------------------------------------------------

def bench(args):
    am = make_method(args.problem, args.method, args.batch, device=args.device, compile=args.compile)
    trainer = Trainer(am)
    for _ in range(args.warmup):
        trainer.step()
    buffered = isinstance(am, BufferedAdjointMatching)
    if buffered:  # warm up a whole cycle: the refill is the first iteration of each
        for _ in range(am.refill_every - args.warmup % am.refill_every):
            trainer.step()
    times = []
    start = time.perf_counter()
    while (len(times) < args.min_iters or time.perf_counter() - start < args.min_time
           or (buffered and len(times) % am.refill_every)):
        trainer.step(times)
    # A buffer's refill makes one iteration of each cycle long: its time per iteration is the mean over whole cycles.
    average = statistics.mean if buffered else statistics.median
    ms = lambda key: 1e3 * average(t[key] for t in times)  # noqa: E731
    out = {
        "problem": args.problem,
        "method": args.method,
        "label": LABELS[args.problem],
        "implementation": "pytorch",
        "torch": torch.__version__,
        "device": args.device,
        "compiled": args.compile,
        "threads": torch.get_num_threads(),
        "batch": am.batch,
        "K": am.K,
        "iterations_timed": len(times),
        "iteration_ms": ms("iteration"),
        "iteration_ms_mean": 1e3 * statistics.mean(t["iteration"] for t in times),
        "regression_ms": ms("regression"),
    }
    if args.method == "am":
        out.update(loss_steps=am.early + am.late, rollout_ms=ms("rollout"), lean_adjoint_ms=ms("lean_adjoint"))
    elif buffered:
        out.update(buffer_size=am.size, passes=am.passes, weights=am.weights, refill_and_weights_ms=ms("endpoints"))
    else:
        out.update(noise_draws=am.M, endpoints_ms=ms("endpoints"))
    print(json.dumps(out))


def trace(args, lr, out=sys.stdout):
    am = make_method(args.problem, args.method, args.batch)
    trainer = Trainer(am, lr=lr)
    rows = []
    for _ in range(args.trace):
        row = trainer.step()
        rows.append(row)
        if out:
            print(json.dumps(row), file=out, flush=True)
    return rows


# --- checks -----------------------------------------------------------------------------------------

class Checks:
    def __init__(self):
        self.failed = 0

    def report(self, name, value, tol, detail=""):
        ok = value <= tol
        self.failed += not ok
        print(f"[{'ok' if ok else 'FAIL'}] {name}: {value:.3g} (tolerance {tol:g}){detail}", flush=True)


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def check_gmm(c):
    """The closed-form VJP against autograd through the velocity, and the velocity against
    v = (x + (1 - t) grad log p_t(x)) / t (linear schedule) from autograd of log p_t: both in float64,
    for the ring mixture of the demo (diagonal path) and a random full-covariance one."""
    d2 = torch.float64
    g = make_generator(7)
    ring = make_problem("2d", dtype=d2).model.base
    L = torch.randn(5, 3, 3, generator=g, dtype=d2)
    full = GmmVelocity(torch.rand(5, generator=g, dtype=d2) + 0.1, 2 * torch.randn(5, 3, generator=g, dtype=d2),
                       L @ L.transpose(1, 2) + 0.1 * torch.eye(3, dtype=d2), d2)
    assert ring.diagonal and not full.diagonal
    for name, gmm in (("ring (diagonal)", ring), ("full covariances", full)):
        worst_vjp = worst_v = 0.0
        for t in (0.0, 0.05, 0.3, 0.7, 0.97, 1.0):
            x = 3 * torch.randn(64, gmm.dim, generator=g, dtype=d2)
            a = torch.randn(64, gmm.dim, generator=g, dtype=d2)
            vjp, v = gmm.vjp(x, t, a)
            xg = x.clone().requires_grad_(True)
            v_ag = gmm.velocity(xg, t)
            (vjp_ag,) = torch.autograd.grad(v_ag, xg, a)
            worst_vjp = max(worst_vjp, rel_err(vjp, vjp_ag), rel_err(v, v_ag.detach()))
            if 0.0 < t < 1.0:
                xg = x.clone().requires_grad_(True)
                (score,) = torch.autograd.grad(gmm.log_prob(xg, t).sum(), xg)
                worst_v = max(worst_v, rel_err(v, (x + (1 - t) * score) / t))
        c.report(f"GMM {name}: closed-form VJP vs autograd, max rel. error", worst_vjp, 1e-12)
        c.report(f"GMM {name}: velocity vs (x + (1-t) score)/t, max rel. error", worst_v, 1e-12)


def check_adjoint(c, problem):
    """The lean adjoint a_k equals d g(X^_1) / d X_k, g = -lambda r, by autograd through the whole
    discretised trajectory whose steps follow the base drift, X_{k+1} = X_k + h b_base(X_k) + (rest),
    with 'rest' (noise, and the residual network's part of the drift) held fixed. The residual network
    is given random non-zero weights first, so the fine-tuned and base drifts differ. float64."""
    d2 = torch.float64
    am = make_problem(problem, batch=16, dtype=d2)
    g = make_generator(11)
    with torch.no_grad():
        for p in am.model.net.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=g, dtype=d2))
    xs = am.rollout(g)
    a, v_base, x1 = am.lean_adjoint(xs)

    def base_drift(x, k):
        c_v, c_x = am.coef[k]
        return c_v * am.model.base.velocity(x, am.t[k]) - c_x * x

    states = [xs[0].clone().requires_grad_(True)]
    for k in range(am.K - 1):
        x = states[-1]
        with torch.no_grad():
            rest = xs[k + 1] - xs[k] - am.h[k] * base_drift(xs[k], k)
        x_next = x + am.h[k] * base_drift(x, k) + rest
        x_next.retain_grad()
        states.append(x_next)
    last = am.K - 1
    x1_ag = states[last] + am.h[last] * am.model.base.velocity(states[last], am.t[last])
    (-am.lam * am.reward.value(x1_ag)).sum().backward()
    replay = max(rel_err(s.detach(), x) for s, x in zip(states, xs))
    worst = max(rel_err(a[k], states[k].grad) for k in range(am.K))
    worst = max(worst, rel_err(a[am.K], -am.lam * am.reward.grad(x1_ag.detach())))
    c.report(f"{problem}: replayed trajectory vs rollout states, max rel. error", replay, 1e-12)
    c.report(f"{problem}: lean adjoint a_0..a_K vs autograd through the trajectory, max rel. error", worst, 1e-9,
             f"; |a_0| = {a[0].norm().item():.3g}, |a_K| = {a[am.K].norm().item():.3g}")


def run_cpp_trace(binary, problem, iterations, lr, method="am"):
    p = {"2d": "0", "64d": "1", "digits": "2", "unet": "3"}[problem]
    out = subprocess.run([binary, f"--tilt_trace={p},{iterations},{lr},{method}"], check=True,
                         capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def expected_rewards_2d():
    """E[r] under the 2-D demo's base and under p* ∝ p_base exp(r), in closed form: the quadratic reward
    maps N(mu, s2 I) to N(mu', s2' I), s2' = 1 / (1/s2 + a), mu' = s2' (mu / s2 + a c), with weight
    ∝ w N(mu; c, (s2 + 1/a) I), and E_N(m, S I)[r] = -a/2 (d S + |m - c|^2)."""
    s2, a = 0.25, 0.25
    c = torch.tensor([2.5, 0.0], dtype=torch.float64)
    mu = torch.tensor([[3.0 * math.cos(2 * math.pi * k / 8), 3.0 * math.sin(2 * math.pi * k / 8)] for k in range(8)],
                      dtype=torch.float64)
    e_base = (-0.5 * a * (2 * s2 + ((mu - c) ** 2).sum(1))).mean().item()
    s2t = 1.0 / (1.0 / s2 + a)
    mut = s2t * (mu / s2 + a * c)
    w = torch.softmax(-0.5 * ((mu - c) ** 2).sum(1) / (s2 + 1.0 / a), 0)
    e_tilt = (w * (-0.5 * a * (2 * s2t + ((mut - c) ** 2).sum(1)))).sum().item()
    return e_base, e_tilt


def check_training(c, args):
    """A few hundred iterations on the 2-D demo with a demo-sized learning rate: the mean reward must
    close most of the gap from the base's E[r] to p*'s; and, given the C++ bench binary, the same run of
    the C++ Trainer (same seeds) must give the same numbers."""
    lr, n = 4e-3, args.check_iterations
    ns = argparse.Namespace(problem="2d", method="am", batch=256, trace=n)
    t0 = time.perf_counter()
    py = trace(ns, lr, out=None)
    print(f"  (PyTorch: {n} iterations on the 2-D demo in {time.perf_counter() - t0:.1f} s)", flush=True)
    w = max(1, n // 10)
    first = statistics.mean(r["reward"] for r in py[:w])
    last = statistics.mean(r["reward"] for r in py[-w:])
    e_base, e_tilt = expected_rewards_2d()
    print(f"  mean reward: E_base[r] = {e_base:.3f}, E_p*[r] = {e_tilt:.3f}; iteration 1 {py[0]['reward']:.3f}, "
          f"first {w} iterations {first:.3f}, last {w} {last:.3f}", flush=True)
    c.report("2d training: share of the gap E_base[r] -> E_p*[r] left after training",
             (e_tilt - last) / (e_tilt - e_base), 0.3)
    if not args.cpp_bench:
        print("  (no --cpp-bench: the comparison with the C++ Trainer was skipped)")
        return
    cpp = run_cpp_trace(args.cpp_bench, "2d", n, lr)
    assert len(cpp) == n, f"C++ trace has {len(cpp)} rows, expected {n}"
    for key in ("loss", "reward", "grad_norm", "adjoint_norm_t0"):
        e1 = abs(cpp[0][key] - py[0][key]) / abs(cpp[0][key])
        e5 = max(abs(cpp[i][key] - py[i][key]) / abs(cpp[i][key]) for i in range(min(5, n)))
        c.report(f"2d vs C++ Trainer, {key}: rel. difference, iteration 1 (max over 1-5: {e5:.2g})", e1, 1e-4)
    cfirst = statistics.mean(r["reward"] for r in cpp[:w])
    clast = statistics.mean(r["reward"] for r in cpp[-w:])
    print(f"  C++ mean reward: first {w} iterations {cfirst:.3f}, last {w} {clast:.3f}", flush=True)
    c.report("2d vs C++ Trainer: |difference| of the last tenth's mean reward", abs(clast - last), 0.1)
    check_methods(c, args.cpp_bench)


def compare_trace(c, binary, problem, method, n, lr, keys):
    """n iterations of `method` on `problem` here and in the C++ Trainer: each of `keys` within 1e-3 relative."""
    ns = argparse.Namespace(problem=problem, method=method, batch=None, trace=n)
    py = trace(ns, lr, out=None)
    cpp = run_cpp_trace(binary, problem, n, lr, method)
    if len(cpp) != n:
        c.report(f"{problem} {method}: C++ trace rows (expected {n})", float(abs(len(cpp) - n)), 0)
        return
    for key in keys:
        e = max(abs(cpp[i][key] - py[i][key]) / max(abs(cpp[i][key]), 1e-12) for i in range(n))
        c.report(f"{problem} {method} vs C++ Trainer, {key}: max rel. difference over {n} iterations", e, 1e-3)


def check_methods(c, binary):
    """The first iterations of every method against the C++ Trainer (tilt_bench --tilt_trace), number by number: the
    same initial weights (the same generator draws), endpoints, noisings, critic, path weights and buffers."""
    am_keys = ("loss", "reward", "grad_norm", "adjoint_norm_t0")
    # Adjoint Matching on the 64-D and digits problems (the 2-D one: check_training's long run).
    for problem in ("64d", "digits"):
        compare_trace(c, binary, problem, "am", 3, 2e-5, am_keys)
    # RAM, EAM and the buffers, with a learning rate of 1e-3 so that the model (and RAM's critic) has moved by
    # iteration 3; the buffers for 18 iterations, so that the second refill (iteration 17) is compared too.
    keys = {"ram": ("loss", "reward", "grad_norm", "critic_loss"), "eam": ("loss", "reward", "grad_norm", "score_gap"),
            "eam_w": ("loss", "reward", "grad_norm", "score_gap", "ess"), "buf": ("loss", "grad_norm"),
            "buf_w": ("loss", "grad_norm")}
    for problem in ("2d", "digits"):
        for method, names in keys.items():
            compare_trace(c, binary, problem, method, 18 if method.startswith("buf") else 3, 1e-3, names)
    # The U-Net with LoRA: the same weights and adapters; iteration 2 after the adapters' B has moved off 0.
    for method, names in (("am", am_keys), ("eam", keys["eam"])):
        compare_trace(c, binary, "unet", method, 2, 1e-3, names)
    check_lora_forms(c)


def check_lora_forms(c):
    """--lora-form adapter (peft's W x + (alpha/r) B (A x)) against the merged weight: the velocity and the adapters'
    gradients of the U-Net with random B, in float64."""
    model = Lora(1, 2, dtype=torch.float64)
    g = make_generator(11)
    with torch.no_grad():
        for _, b in model.adapted.adapters.values():
            b.copy_(0.1 * torch.randn(b.shape, generator=g, dtype=torch.float64))
    x = torch.randn(2, model.dim, generator=g, dtype=torch.float64)
    t = torch.tensor([0.3, 0.7], dtype=torch.float64)
    out = {}
    try:
        for form in ("merged", "adapter"):
            UNetVelocity.lora_form = form
            v = model.velocity(x, t)
            out[form] = (v.detach(), torch.autograd.grad(v.pow(2).sum(), model.trainable()))
    finally:
        UNetVelocity.lora_form = "merged"
    (v0, g0), (v1, g1) = out["merged"], out["adapter"]
    c.report("U-Net LoRA, peft's form against the merged weight: velocity", rel_err(v1, v0), 1e-12)
    c.report("U-Net LoRA, peft's form against the merged weight: adapter gradients",
             max(rel_err(a, b) for a, b in zip(g1, g0)), 1e-12)


def check(args):
    c = Checks()
    if args.check_methods:
        if not args.cpp_bench:
            raise SystemExit("--check-methods needs --cpp-bench")
        check_methods(c, args.cpp_bench)
        print("all checks passed" if c.failed == 0 else f"{c.failed} check(s) FAILED")
        return 1 if c.failed else 0
    check_gmm(c)
    check_adjoint(c, "2d")
    check_adjoint(c, "64d")
    check_adjoint(c, "digits")
    check_training(c, args)
    print("all checks passed" if c.failed == 0 else f"{c.failed} check(s) FAILED")
    return 1 if c.failed else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problem", choices=["2d", "64d", "digits", "unet", "unet_residual"], default="2d")
    ap.add_argument("--method", choices=METHODS, default="am",
                    help="am (Adjoint Matching), ram, eam (ODE endpoints), eam_w (weighted SDE endpoints), buf "
                         "(a buffer of 4 batches x 4 passes, unweighted) or buf_w (weighted)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--device", default="cpu",
                    help="timing of the U-Net problems only: cpu (default), cuda or cuda:N (random draws stay on the "
                         "CPU generator, as tilt's)")
    ap.add_argument("--compile", action="store_true",
                    help="timing of the U-Net problems only: the networks under torch.compile (PyTorch 2.x)")
    ap.add_argument("--lora-form", choices=["merged", "adapter"], default="merged",
                    help="--problem unet: each adapted layer computes with its merged weight W + (alpha/r) B A "
                         "(default) or as W x + (alpha/r) B (A x) everywhere, as peft's LoRA layers do")
    ap.add_argument("--batch", type=int, default=None, help="default: the problem's (256; digits 64)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed iterations first (default 5)")
    ap.add_argument("--min-time", type=float, default=3.0, help="time at least this many seconds (default 3)")
    ap.add_argument("--min-iters", type=int, default=10, help="and at least this many iterations (default 10)")
    ap.add_argument("--check", action="store_true", help="run the correctness checks instead of timing")
    ap.add_argument("--check-iterations", type=int, default=300)
    ap.add_argument("--check-methods", action="store_true",
                    help="only the first iterations of every method (and of the U-Net) against --cpp-bench (a ctest)")
    ap.add_argument("--cpp-bench", help="with --check: tilt_bench binary to compare the Trainer's numbers with")
    ap.add_argument("--trace", type=int, default=0, help="print N iterations' metrics as JSON lines")
    ap.add_argument("--lr", type=float, default=2e-5, help="with --trace: Adam's learning rate")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    UNetVelocity.lora_form = args.lora_form
    if args.check or args.check_methods:
        sys.exit(check(args))
    if args.trace:
        trace(args, args.lr)
        return
    bench(args)


if __name__ == "__main__":
    main()
