"""
Tests for nami.py: the piecewise-flow equations, jumps, samplers, loss and model, checked
against independent math (closed forms written out here, Monte Carlo, torch's FLOP
counter), never against nami.py's own output. Run: python -m pytest -q test_nami.py
Monte Carlo tolerances are stated next to each check (about 4-5 standard errors).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import nami
from nami import Text

torch.set_num_threads(2)


def text(B, T=5, dim=384, pooled=384, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Text(torch.randn(B, T, dim, generator=g), torch.ones(B, T, dtype=torch.bool),
                torch.randn(B, pooled, generator=g))


def randomised(model, seed=0, std=0.05):
    """A model with every weight non-zero (zero-init layers would hide most bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return model


def pool2(x):
    """2x2 average pooling written as a reshape, independent of F.avg_pool2d."""
    B, C, H, W = x.shape
    return x.reshape(B, C, H // 2, 2, W // 2, 2).mean((3, 5))


# ---------------------------------------------------------------- window boundaries

@pytest.mark.parametrize("ratios, expected", [
    ((1, 1, 1), [(1, 2 / 3), (0.8, 1 / 3), (0.5, 0)]),                   # the paper's K = 3
    ((1, 1), [(1, 0.5), (2 / 3, 0)]),                                     # a_start = .5 / 1.5
    ((1, 1, 1, 1), [(1, .75), (6 / 7, .5), (2 / 3, .25), (0.4, 0)]),       # .25/1.75, .5/1.5, .75/1.25
    ((2, 1, 1), [(1, 0.5), (2 / 3, 0.25), (0.4, 0)]),                     # non-uniform
    ((1, 2, 3), [(1, 5 / 6), (1 - (1 / 6) / (11 / 6), 0.5), (1 - 0.5 / 1.5, 0)]),
    ((5,), [(1, 0)]),                                                     # K = 1: plain flow
])
def test_window_bounds(ratios, expected):
    got = nami.window_bounds(ratios)
    assert len(got) == len(expected)
    for (s, e), (s_ref, e_ref) in zip(got, expected):
        assert s == pytest.approx(s_ref, abs=1e-12) and e == pytest.approx(e_ref, abs=1e-12)


def test_window_start_preserves_variance():
    # Independent derivation of the corrected start: after Up, the low-res noise m is shared
    # by the 4 pixels of a block. Scaling by c and adding d*detail must give i.i.d. noise of
    # variance (1-s)^2 with data weight s = c*a. Solve those two equations numerically.
    for ratios in [(1, 1, 1), (1, 2, 3), (3, 1), (1, 1, 1, 1)]:
        b = nami.window_bounds(ratios)
        for k in range(1, len(ratios)):
            a = 1 - b[k - 1][1]
            # within-block covariance: c^2 (1-a)^2 * J + d^2 * (I - J/4) * 4/3 ; want (1-ca)^2 I
            # off-diagonal: c^2 (1-a)^2 - d^2/3 = 0 ; diagonal: c^2 (1-a)^2 + d^2 = (1 - c a)^2
            # -> 4 c^2 (1-a)^2 = (1 - c a)^2, bisection on c in (0, 1]
            lo, hi = 1e-9, 1.0
            for _ in range(200):
                c = (lo + hi) / 2
                lo, hi = (c, hi) if 2 * c * (1 - a) < 1 - c * a else (lo, c)
            assert 1 - b[k][0] == pytest.approx(c * a, abs=1e-9)


def test_bad_windows_and_resolution_errors():
    with pytest.raises(ValueError, match="positive"):
        nami.window_bounds((1, 0, 1))
    with pytest.raises(ValueError, match="divisible by patch"):
        nami.preset("tiny", resolution=36)
    with pytest.raises(ValueError, match="one ratio per stage"):
        nami.preset("tiny", windows=(1, 1))
    with pytest.raises(ValueError, match="unknown preset"):
        nami.preset("huge")


# ---------------------------------------------------------------- Down / Up

def test_down_up():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=g)
    assert torch.equal(nami.down(nami.up(x)), x)
    assert torch.allclose(nami.down(x), pool2(x), atol=1e-6)
    assert torch.allclose(nami.down(x, 4), pool2(pool2(x)), atol=1e-6)
    assert torch.equal(nami.up(x)[..., ::2, 1::2], x) and torch.equal(nami.up(x)[..., 1::2, ::2], x)
    # bilinear resize to exactly half size is the same operator (Pyramid Flow's Down)
    assert torch.allclose(nami.down(x), F.interpolate(x, scale_factor=0.5, mode="bilinear"), atol=1e-6)
    n = torch.randn(4000, 1, 16, 16, generator=g)
    v = (2 * nami.down(n)).var().item()                 # 256k values: std error of var ~0.003
    assert abs(v - 1) < 0.015


def test_block_noise_statistics():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(20000, 1, 8, 8, generator=g)
    nb = (2 / math.sqrt(3)) * nami.block_detail(z)      # block noise n'
    blocks = nami.to_blocks(nb).reshape(-1, 4)          # 320k blocks of 4
    assert blocks.sum(1).abs().max() < 1e-5             # zero sum per block
    cov = blocks.T @ blocks / len(blocks)
    ref = torch.full((4, 4), -1 / 3) + torch.eye(4) * (4 / 3)
    assert (cov - ref).abs().max() < 0.01               # std error ~0.0025
    # and blocks are independent of each other (neighbouring block, same position)
    left, right = nb[..., 0::4, 0::4].flatten(), nb[..., 0::4, 2::4].flatten()
    assert abs((left * right).mean()) < 0.01


# ---------------------------------------------------------------- in-window path

@pytest.mark.parametrize("k", [1, 2, 3])
def test_training_point_path(k):
    g = torch.Generator().manual_seed(k)
    s, e = [(1, 2 / 3), (0.8, 1 / 3), (0.5, 0.0)][k - 1]
    x = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    n = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    coarse = pool2(x).repeat_interleave(2, -1).repeat_interleave(2, -2)
    start = (1 - s) * coarse + s * n
    end = (1 - e) * x + e * n
    zeros, ones = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    xt0, sig0, _ = nami.training_point(x, n, (s, e), zeros)
    xt1, sig1, _ = nami.training_point(x, n, (s, e), ones)
    assert torch.allclose(xt0, start) and torch.allclose(xt1, end)
    assert torch.allclose(sig0, torch.full_like(sig0, s)) and torch.allclose(sig1, torch.full_like(sig1, e))
    r = torch.tensor([0.1, 0.3, 0.6, 0.9], dtype=torch.float64)
    xt, sig, target = nami.training_point(x, n, (s, e), r)
    # target = dx/dsigma, by central finite differences along the path
    h = 1e-5
    xp, sp, _ = nami.training_point(x, n, (s, e), r + h)
    xm, sm, _ = nami.training_point(x, n, (s, e), r - h)
    fd = (xp - xm) / (sp - sm).view(-1, 1, 1, 1)
    assert torch.allclose(target, fd, atol=1e-6)
    # sigma is the true noise level: the coefficient of the noise in x_t ...
    x2, _, _ = nami.training_point(x, 2 * n, (s, e), r)
    coef = ((x2 - xt) / n).flatten(1)
    assert torch.allclose(coef, sig[:, None].expand_as(coef), atol=1e-8)
    # ... and the data part of a constant image has weight 1 - sigma
    c = torch.ones_like(x)
    xc, sc, _ = nami.training_point(c, torch.zeros_like(x), (s, e), r)
    assert torch.allclose(xc, (1 - sc).view(-1, 1, 1, 1).expand_as(xc))


def test_k1_is_plain_rectified_flow():
    g = torch.Generator().manual_seed(0)
    x, n = torch.randn(3, 3, 4, 4, generator=g), torch.randn(3, 3, 4, 4, generator=g)
    r = torch.tensor([0.2, 0.5, 0.7])
    xt, sig, target = nami.training_point(x, n, (1.0, 0.0), r)
    assert torch.allclose(sig, 1 - r)
    assert torch.allclose(xt, (1 - sig).view(-1, 1, 1, 1) * x + sig.view(-1, 1, 1, 1) * n, atol=1e-6)
    assert torch.allclose(target, n - x, atol=1e-6)


def test_time_sampling_and_shift():
    g = torch.Generator().manual_seed(0)
    u = nami.logit_normal(200000, g)
    logit = torch.log(u / (1 - u))
    assert abs(logit.mean()) < 0.01 and abs(logit.std() - 1) < 0.01
    assert nami.time_shift(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)
    assert nami.time_shift(torch.tensor([0.0, 1.0]), 3.0).tolist() == [0.0, 1.0]
    assert nami.resolution_shift(256) == pytest.approx(math.exp(0.5))
    assert nami.resolution_shift(4096) == pytest.approx(math.exp(1.15))


# ---------------------------------------------------------------- jumps

def start_statistics(jump, k, n=6000, seed=0, bounds=None):
    """Monte Carlo of a jump k-1 -> k from stage k-1's training end point, for ONE fixed
    data image: returns (mean error, max within-block covariance error, cross-block cov)."""
    bounds = bounds or nami.window_bounds((1, 1, 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1   # stage-k data
    x_lo = pool2(x)
    a = 1 - bounds[k - 2][1]
    m = torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64)
    e = a * x_lo + (1 - a) * m                            # stage k-1's training end point
    z = torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64)
    out = jump(e, z)
    s = bounds[k - 1][0]                                  # stage k's training start noise level
    mean_ref = (1 - s) * x_lo.repeat_interleave(2, -1).repeat_interleave(2, -2)
    mean_err = (out.mean(0, keepdim=True) - mean_ref).abs().max().item()
    noise = out - mean_ref
    blocks = nami.to_blocks(noise).reshape(-1, 3, 4)      # (n*16, C, 4)
    cov = torch.einsum("nci,ncj->cij", blocks, blocks) / len(blocks)
    cov_err = (cov - s * s * torch.eye(4, dtype=torch.float64)).abs().max().item()
    cross = (noise[..., 0::2, 0::2][..., :, :-1] * noise[..., 0::2, 2::2]).mean().item()
    return mean_err, cov_err, abs(cross)


@pytest.mark.parametrize("k", [2, 3])
def test_renoise_matches_training_start(k):
    # 6000 samples x 16 blocks per channel: covariance std error ~ s^2 * 0.004
    a = 1 - nami.window_bounds((1, 1, 1))[k - 2][1]
    mean_err, cov_err, cross = start_statistics(lambda e, z: nami.renoise(e, a, z), k)
    assert mean_err < 0.05                                # mean std error ~ s/sqrt(6000) = 0.012
    assert cov_err < 0.02 and cross < 0.01


def test_plain_upsampling_fails_the_same_test():
    # the test has teeth: Up(e) without renoising keeps block-correlated noise
    mean_err, cov_err, _ = start_statistics(lambda e, z: nami.up(e), 2)
    assert cov_err > 0.1


def fitted_bridge(channels=3, ratios=(1, 1, 1), batches=8, seed=0):
    """A BridgeFlow zeroed, then pre-trained on synthetic data (random smooth images with
    correlated channels), as train.py does on real data."""
    bounds = nami.window_bounds(ratios)
    br = nami.BridgeFlow(channels, bounds)
    with torch.no_grad():
        for p in br.parameters():
            p.zero_()
    g = torch.Generator().manual_seed(seed)
    for k in range(2, len(ratios) + 1):
        def pairs():
            for _ in range(batches):
                base = torch.randn(256, 1, 4, 4, generator=g)
                x = nami.up(nami.up(base)) * torch.tensor([1.0, 0.5, -0.8]).view(1, 3, 1, 1)[:, :channels]
                x = x + 0.3 * torch.randn(256, channels, 16, 16, generator=g)
                yield nami.bridge_pairs(nami.down(x, 2 ** (len(ratios) - k)), k, bounds, g)
        br.fit(k, pairs())
    return br


@pytest.mark.parametrize("k", [2, 3])
def test_bridgeflow_after_pretraining_matches_training_start(k):
    br = fitted_bridge().double()
    mean_err, cov_err, cross = start_statistics(lambda e, z: br(e, k, z), k)
    assert mean_err < 0.05 and cov_err < 0.02 and cross < 0.01


def test_bridgeflow_fit_recovers_renoise_and_minimises_its_mse():
    bounds = nami.window_bounds((1, 1, 1))
    br = fitted_bridge()
    for k in (2, 3):
        a = 1 - bounds[k - 2][1]
        c, s = 1 / (2 - a), bounds[k - 1][0]
        W = torch.zeros(12, 3)
        for ch in range(3):
            W[4 * ch: 4 * ch + 4, ch] = c                   # each cell copied to its block, scaled
        G = s * torch.block_diag(*[torch.eye(4) - 0.25] * 3)
        assert (br.W[k - 2] - W).abs().max() < 1e-4
        assert br.b[k - 2].abs().max() < 1e-4
        assert (br.G[k - 2] - G).abs().max() < 1e-3
    # the written-out objective E||T - (W e + b + V xi)||^2 has zero gradient at the fit
    g = torch.Generator().manual_seed(9)
    x = torch.randn(512, 3, 8, 8, generator=g)
    e, xi, T = nami.bridge_pairs(x, 3, bounds, g)
    W = br.W[1].detach().clone().requires_grad_()
    b = br.b[1].detach().clone().requires_grad_()
    V = (bounds[2][0] * torch.block_diag(*[torch.eye(4) - 0.25] * 3)).requires_grad_()
    pred = e.permute(0, 2, 3, 1) @ W.T + b + nami.to_blocks(xi) @ V.T
    loss = ((nami.to_blocks(T) - pred) ** 2).mean()
    assert loss.item() < 1e-8
    loss.backward()
    assert W.grad.abs().max() < 1e-4 and b.grad.abs().max() < 1e-4


def test_bridgeflow_init_equals_renoise():
    bounds = nami.window_bounds((1, 1, 1))
    br = nami.BridgeFlow(3, bounds)
    g = torch.Generator().manual_seed(0)
    e, z = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    assert torch.allclose(br(e, 2, z), nami.renoise(e, 1 - bounds[0][1], z), atol=1e-6)


def test_bridgeflow_on_model_endpoints_keeps_covariance():
    # Fit on "model" end points that are biased and noisy (0.8 e + 0.1 + 0.1 eps): the
    # least-squares mean shrinks, and G must add back exactly the missing variance, so what
    # BridgeFlow hands stage k keeps the training start's mean and covariance; renoise
    # applied to the same end points does not.
    bounds = nami.window_bounds((1, 1))
    g = torch.Generator().manual_seed(0)
    br = nami.BridgeFlow(1, bounds)

    def model_pairs(n):
        x = torch.randn(n, 1, 8, 8, generator=g) * 0.7 + 0.2
        e, xi, T = nami.bridge_pairs(x, 2, bounds, g)
        return 0.8 * e + 0.1 + 0.1 * torch.randn(e.shape, generator=g), xi, T

    br.fit(2, (model_pairs(1024) for _ in range(6)))
    e_hat, xi, T = model_pairs(8000)
    with torch.no_grad():
        out = br(e_hat, 2, torch.randn(xi.shape, generator=g))
    naive = nami.renoise(e_hat, 1 - bounds[0][1], torch.randn(xi.shape, generator=g))
    cov = lambda y: torch.cov(nami.to_blocks(y).reshape(-1, 4).T)
    # 128k blocks: covariance std error ~0.005, mean std error ~0.003
    assert (cov(out) - cov(T)).abs().max() < 0.025 and abs(out.mean() - T.mean()) < 0.015
    assert (cov(naive) - cov(T)).abs().max() > 0.05 or abs(naive.mean() - T.mean()) > 0.05


# ---------------------------------------------------------------- oracle sampling

class Oracle(torch.nn.Module):
    """The exact velocity field of the piecewise flow for a single data point x*, written
    from the closed form (independent of nami.training_point): in window (s, e) of stage k
    the path is x = P(sigma) + sigma n with P(sigma) = (1-r)(1-s) Up(Down x_k) + r (1-e) x_k,
    r = (s - sigma)/(s - e), so v = dP/dsigma + (x - P(sigma)) / sigma."""

    def __init__(self, cfg, x_star, windows, bridge=None):
        super().__init__()
        self.cfg, self.x_star, self.windows, self.bridge = cfg, x_star, windows, bridge
        self.dummy = torch.nn.Parameter(torch.zeros((), dtype=x_star.dtype))
        self.calls = []

    def conditioning(self, t, pooled, stage, depth):
        return [t]       # the sampler computes a window's conditioning ahead: here, the time

    def forward(self, x, sigma, text, stage, depth, cond=None):
        sigma = sigma if cond is None else cond[0]
        self.calls.append((stage, depth, x.shape[-1]))
        xk = self.x_star
        for _ in range(self.cfg.K - stage):
            xk = pool2(xk)
        U = pool2(xk).repeat_interleave(2, -1).repeat_interleave(2, -2)
        s, e = self.windows[stage - 1]
        sg = sigma.view(-1, 1, 1, 1).to(x.dtype)
        r = (s - sg) / (s - e)
        P = (1 - r) * (1 - s) * U + r * (1 - e) * xk
        return ((1 - s) * U - (1 - e) * xk) / (s - e) + (x - P) / sg


WINDOWS3 = [(1.0, 2 / 3), (0.8, 1 / 3), (0.5, 0.0)]


@pytest.mark.parametrize("transition", ["renoise", "bridge"])
@pytest.mark.parametrize("steps", [(1, 1, 1), (2, 3, 5), (10, 10, 10)])
@pytest.mark.parametrize("shift", [False, True])
def test_oracle_sampler_lands_on_the_data_point(transition, steps, shift):
    cfg = nami.preset("tiny", windows=(1, 1, 1), time_shift=shift)   # the windows WINDOWS3 writes out
    g = torch.Generator().manual_seed(0)
    x_star = torch.rand(2, 3, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
    oracle = Oracle(cfg, x_star, WINDOWS3, fitted_bridge().double() if transition == "bridge" else None)
    noise = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    out, ends = nami.sample(oracle, text(2), steps=steps, transition=transition, generator=g, noise=noise)
    assert (out - x_star).abs().max() < 1e-4
    # Euler keeps (x - P(sigma)) / sigma fixed on this field, so window 1 (from pure noise)
    # must end exactly at (1 - e_1) x_1 + e_1 noise: the sampler used the windows written above
    assert torch.allclose(ends[0], (1 / 3) * pool2(pool2(x_star)) + (2 / 3) * noise, atol=1e-6)
    assert [t.shape[-1] for t in ends] == [8, 16, 32]
    # stage k was evaluated steps[k] times, at its resolution, with its nested depth 2/4/6
    assert oracle.calls == [(1, 2, 8)] * steps[0] + [(2, 4, 16)] * steps[1] + [(3, 6, 32)] * steps[2]


def test_sampler_can_start_in_a_later_window():
    # first=k runs windows k..K from the given start state (sample.py --stage-check uses it)
    cfg = nami.preset("tiny", windows=(1, 1, 1))
    g = torch.Generator().manual_seed(2)
    x_star = torch.rand(2, 3, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
    for first in (2, 3):
        oracle = Oracle(cfg, x_star, WINDOWS3)
        size = 32 >> (3 - first)
        start = torch.randn(2, 3, size, size, generator=g, dtype=torch.float64)
        out, ends = nami.sample(oracle, text(2), steps=(3, 4, 5)[first - 1:], generator=g, noise=start, first=first)
        assert (out - x_star).abs().max() < 1e-4 and len(ends) == 4 - first
        assert oracle.calls == [(k, 2 * k, 32 >> (3 - k)) for k in range(first, 4) for _ in range((3, 4, 5)[k - 1])]
    with pytest.raises(ValueError, match=r"numbered 1\.\.3"):
        nami.sample(oracle, text(2), steps=(1,), noise=start, first=4)
    with pytest.raises(ValueError, match="start state"):
        nami.sample(oracle, text(2), steps=(1, 1), first=2)


@pytest.mark.parametrize("steps", [1, 7, 30])
def test_oracle_baseline_sampler(steps):
    cfg = nami.preset("tiny", baseline=True)
    g = torch.Generator().manual_seed(1)
    x_star = torch.rand(2, 3, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
    oracle = Oracle(cfg, x_star, [(1.0, 0.0)])
    out, ends = nami.sample(oracle, text(2), steps=(steps,), generator=g)
    assert (out - x_star).abs().max() < 1e-4 and len(ends) == 1


# ---------------------------------------------------------------- model

def tiny_model(**kw):
    cfg = nami.preset("tiny", **{"width": 64, "heads": 2, **kw})
    torch.manual_seed(0)
    return randomised(nami.NAMI(cfg))


def test_zero_initialised_model_outputs_zeros_at_every_stage_resolution():
    cfg = nami.preset("tiny", width=64, heads=2)
    m = nami.NAMI(cfg)
    for k in (1, 2, 3):
        r = cfg.stage_resolution(k)
        out = m(torch.randn(2, 3, r, r), torch.rand(2), text(2), stage=k)
        assert out.shape == (2, 3, r, r) and out.abs().max() == 0


def test_every_stage_outputs_its_resolution_and_depends_on_its_input():
    m = tiny_model()
    for k, r in zip((1, 2, 3), (8, 16, 32)):
        x = torch.randn(2, 3, r, r)
        out = m(x, torch.rand(2), text(2), stage=k)
        assert out.shape == (2, 3, r, r) and out.abs().max() > 0
        assert not torch.allclose(out, m(x + 1, torch.rand(2), text(2), stage=k))


def count_block_calls(model, fn):
    calls = []
    hooks = [b.register_forward_hook(lambda mod, i, o, j=j: calls.append(j)) for j, b in enumerate(model.blocks)]
    fn()
    for h in hooks:
        h.remove()
    return calls


@pytest.mark.parametrize("nested", [True, False])
def test_nesting_runs_exactly_the_prefix(nested):
    m = tiny_model(stage_layers=(2, 1, 3), double=2, nested=nested)   # depth 6
    expected = {1: 2, 2: 3, 3: 6} if nested else {1: 6, 2: 6, 3: 6}
    for k, r in zip((1, 2, 3), (8, 16, 32)):
        calls = count_block_calls(m, lambda: m(torch.randn(1, 3, r, r), torch.rand(1), text(1), stage=k))
        assert calls == list(range(expected[k]))


def test_stages_share_parameters():
    m = tiny_model(double=2, mlp_ratio=4.0)
    n_params = sum(p.numel() for p in m.parameters())
    d, hid = 64, 256
    # the stack exists once: 2 double + 4 single blocks, not one copy per stage
    dbl = 2 * (6 * d * d + 6 * d + 3 * d * d + 3 * d + d * d + d + d * hid + hid + hid * d + d + 2 * (d // 2))
    sgl = 3 * d * d + 3 * d + d * (3 * d + hid) + 3 * d + hid + (d + hid) * d + d + 2 * (d // 2)
    assert sum(p.numel() for p in m.blocks.parameters()) == 2 * dbl + 4 * sgl
    assert n_params < 2 * (2 * dbl + 4 * sgl)
    # changing a block-0 weight changes every stage's output
    outs = [m(torch.randn(1, 3, r, r, generator=torch.Generator().manual_seed(r)), torch.full((1,), .5), text(1), stage=k)
            for k, r in zip((1, 2, 3), (8, 16, 32))]
    with torch.no_grad():
        m.blocks[0].img_qkv.weight.add_(0.1)
    for (k, r), o in zip(zip((1, 2, 3), (8, 16, 32)), outs):
        o2 = m(torch.randn(1, 3, r, r, generator=torch.Generator().manual_seed(r)), torch.full((1,), .5), text(1), stage=k)
        assert not torch.allclose(o, o2)


def test_padding_tokens_do_not_change_the_output():
    m = tiny_model()
    t = text(2, T=4)
    pad = torch.randn(2, 3, 384) * 10                    # garbage in the padded positions
    padded = Text(torch.cat([t.tokens, pad], 1), torch.cat([t.mask, torch.zeros(2, 3, dtype=torch.bool)], 1), t.pooled)
    x, sg = torch.randn(2, 3, 16, 16), torch.rand(2)
    for k in (1, 2, 3):
        xs = torch.randn(2, 3, 8 * 2 ** (k - 1), 8 * 2 ** (k - 1))
        assert torch.allclose(m(xs, sg, t, stage=k), m(xs, sg, padded, stage=k), atol=1e-5)
    # and the mask matters: without it the garbage does change the output
    unmasked = padded._replace(mask=None)
    assert not torch.allclose(m(x, sg, t, stage=2), m(x, sg, unmasked, stage=2), atol=1e-3)


def test_attention_under_cpu_autocast_is_fp32_math():
    # bf16 training on CPU keeps attention in fp32 (the flash kernel's bf16 backward is slow
    # there): softmax(q k^T / sqrt(Dh)) v of the rotated bf16 inputs, in float64, to fp32 precision
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 7, 8).bfloat16() for _ in range(3))
    ang = torch.rand(7, 4) * 3
    with torch.autocast("cpu", torch.bfloat16):
        out = nami.attention(q, k, v, (ang.cos(), ang.sin()), None)          # (B, N, H*Dh)

    def rotate(x):                                        # pairs (x_2j, x_2j+1) by angle ang_j
        x, c, s = x.double(), ang.cos().double(), ang.sin().double()
        return torch.stack([x[..., 0::2] * c - x[..., 1::2] * s, x[..., 0::2] * s + x[..., 1::2] * c], -1).flatten(-2)
    ref = torch.softmax(rotate(q) @ rotate(k).transpose(-1, -2) / 8 ** 0.5, -1) @ v.double()
    assert out.dtype == torch.float32 and (out - ref.transpose(1, 2).flatten(2)).abs().max() < 1e-5


@pytest.mark.parametrize("N", [18, 200])
def test_attention_and_its_gradient_are_softmax_attention(N):
    # short sequences on CPU take the written-out product, long ones SDPA's flash kernel: both
    # are softmax(q k^T / sqrt(Dh)) v with RoPE, forward and backward, against float64 autograd
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, N, 8, requires_grad=True) for _ in range(3))
    ang, g = torch.rand(N, 4) * 3, torch.randn(2, N, 16)
    grads = torch.autograd.grad((nami.attention(q, k, v, (ang.cos(), ang.sin()), None) * g).sum(), (q, k, v))

    def rotate(x):                                        # pairs (x_2j, x_2j+1) by angle ang_j
        c, s = ang.cos().double(), ang.sin().double()
        return torch.stack([x[..., 0::2] * c - x[..., 1::2] * s, x[..., 0::2] * s + x[..., 1::2] * c], -1).flatten(-2)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = torch.softmax(rotate(q64) @ rotate(k64).transpose(-1, -2) / 8 ** 0.5, -1) @ v64
    refs = torch.autograd.grad((ref.transpose(1, 2).flatten(2) * g.double()).sum(), (q64, k64, v64))
    for a, b in zip(grads, refs):
        assert (a - b).abs().max() < 1e-5


def test_unmasked_attention_is_the_masked_one_when_nothing_is_masked():
    # the hot paths call SDPA without a mask (fixed-length text); a mask of all-True must change nothing
    m, t = tiny_model(), text(2, T=5)
    x, sg = torch.randn(2, 3, 16, 16), torch.rand(2)
    assert torch.allclose(m(x, sg, t, stage=2), m(x, sg, t._replace(mask=None), stage=2), atol=1e-6)


@pytest.mark.parametrize("per_block", [False, True])
def test_compiled_stage_equals_eager(per_block):
    # torch.compile(fullgraph=True) of a stage (sampling's) or of each block (train.py's): no
    # graph breaks (it would raise), the same numbers, and per block (what training runs) the
    # same gradients. Stage 1 runs a double and a single-stream block.
    m = tiny_model(width=32, heads=2, double=1)
    x, sg, t = torch.randn(2, 3, 8, 8), torch.rand(2), text(2, T=14)._replace(mask=None)
    eager = m(x, sg, t, stage=1)
    eager.square().mean().backward()
    grad = lambda p: torch.zeros_like(p) if p.grad is None else p.grad.clone()
    grads = [grad(p) for p in m.parameters()]
    m.zero_grad(set_to_none=True)
    nami.compile_stages(m, per_block=per_block)
    if not per_block:
        with torch.no_grad():
            assert (m(x, sg, t, stage=1) - eager).abs().max() < 1e-4
        # sampling's graph multiplied by the oneDNN copies (nami::packed_linear), split product included
        assert not nami.Linear.packing or all(w in nami.PACKED for w in (m.blocks[0].img_qkv.weight, m.blocks[1].linear2.weight))
        return
    out = m(x, sg, t, stage=1)
    assert (out - eager).abs().max() < 1e-4
    out.square().mean().backward()
    # a compiled block returns zeros, not None, for the weights whose outputs stage 1 leaves unread
    assert all((grad(p) - g).abs().max() < 1e-4 for p, g in zip(m.parameters(), grads))


@pytest.mark.skipif(not nami.Linear.packing, reason="torch without oneDNN")
def test_sampling_linear_is_the_plain_product_and_follows_weight_changes(monkeypatch):
    # nami.Linear's oneDNN copy of its weight (taken on CPU without autograd) against x W^T + b
    # written out; after an in-place write, load_state_dict and a .data swap it uses the new weight
    lin, x = nami.Linear(24, 40), torch.randn(3, 7, 24)
    ref = lambda x, W, b: torch.einsum("bnk,ok->bno", x, W.detach()) + (0 if b is None else b.detach())
    y = lin(x)                                            # autograd on: plain product, no copy
    assert lin.weight not in nami.PACKED and y.requires_grad
    with torch.no_grad():
        for change in (lambda: None, lambda: lin.weight.mul_(-2), lambda: lin.load_state_dict(
                {"weight": torch.randn(40, 24), "bias": torch.randn(40)}), lambda: setattr(lin.weight, "data", torch.randn(40, 24))):
            change()
            assert torch.allclose(lin(x), ref(x, lin.weight, lin.bias), atol=1e-5)
        assert lin.weight in nami.PACKED
        W, b = lin.weight, lin.bias                       # SingleBlock's split output product
        assert torch.allclose(lin(x[..., :10], (0, 10)), ref(x[..., :10], W[:, :10], b), atol=1e-5)
        assert torch.allclose(lin(x[..., 10:], (10, None)), ref(x[..., 10:], W[:, 10:], None), atol=1e-5)
    big = nami.Linear(24, 40)                             # a weight over the size limit keeps F.linear
    monkeypatch.setattr(nami.Linear, "packing_max", 24 * 40 - 1)
    with torch.no_grad():
        assert torch.allclose(big(x), ref(x, big.weight, big.bias), atol=1e-5) and big.weight not in nami.PACKED
    monkeypatch.undo()
    # a whole sampler run: the same images as with F.linear everywhere
    m, t = tiny_model(double=2), text(2, T=6)        # single-stream blocks too
    run = lambda: nami.sample(m, t, text(2, T=6, seed=1), (2, 2, 2), 3.0, generator=torch.Generator().manual_seed(0))[0]
    with torch.no_grad():
        fast = run()
        monkeypatch.setattr(nami.Linear, "packing", False)
        assert (fast - run()).abs().max() < 1e-5


def test_text_positions_make_word_order_visible():
    # the Transformer's sinusoid: [cos(i w_j), sin(i w_j)], w_j = 10000^(-j / (d/2))
    i, d = torch.tensor([0.0, 3.0]), 8
    w = 10000.0 ** (-torch.arange(4) / 4)
    assert torch.allclose(nami.sinusoidal(i, d), torch.cat([torch.cos(i[:, None] * w), torch.sin(i[:, None] * w)], 1))
    # Text tokens carry no rotary phase, so joint attention alone sees them as a set; the
    # position added to each token is what tells "a red circle above a blue square" from
    # "a blue square above a red circle" when the encoder's states barely differ.
    m, t = tiny_model(), text(1, T=6)
    flipped = t._replace(tokens=t.tokens.flip(1))
    x, sg = torch.randn(1, 3, 8, 8), torch.rand(1)
    assert not torch.allclose(m(x, sg, t, stage=1), m(x, sg, flipped, stage=1), atol=1e-4)


def test_cfg_scale_one_is_the_conditional_prediction():
    m = tiny_model()
    cond, unc = text(2, T=6, seed=1), text(2, T=2, seed=2)   # different lengths: padding inside cat
    x, sg = torch.randn(2, 3, 16, 16), torch.rand(2)
    v1 = nami.guided_velocity(m, x, sg, cond, unc, 1.0, stage=2)
    assert torch.allclose(v1, m(x, sg, cond, stage=2), atol=1e-5)
    v3 = nami.guided_velocity(m, x, sg, cond, unc, 3.0, stage=2)
    vu = m(x, sg, unc, stage=2)
    assert torch.allclose(v3, vu + 3 * (m(x, sg, cond, stage=2) - vu), atol=1e-4)


def test_rope_positions_are_shared_across_stages():
    # tiny: head dim 32 = axes (0, 16, 16): 8 rotary pairs for the row, 8 for the column,
    # frequencies theta^(-2j/16) = theta^(-j/8)
    cfg = nami.preset("tiny")
    fine = nami.rope_angles(cfg, 3, 8, 8, 3)                   # stage K: stride 1
    coarse = nami.rope_angles(cfg, 2, 4, 4, 3)                 # one stage lower: stride 2
    assert fine.shape == (3 + 64, 16) and fine[:3].abs().max() == 0   # text: angle 0
    freqs = 1.0 / 10000.0 ** (torch.arange(8, dtype=torch.float64) / 8)
    centre = (torch.arange(4) * 2 + 0.5).double()               # a coarse token covers fine rows 2i, 2i+1
    c = coarse[3:].reshape(4, 4, 16)
    assert torch.allclose(c[:, 0, :8], centre[:, None] * freqs) and torch.allclose(c[0, :, 8:], centre[:, None] * freqs)
    f = fine[3:].reshape(8, 8, 16)
    assert torch.allclose(f[:, 5, :8], torch.arange(8).double()[:, None] * freqs)
    # the release's layout: ids (0, row, col) of each stage's own grid, axes 16 / 56 / 56
    rel = nami.rope_angles(nami.preset("2b"), 1, 4, 4, 2)[2:].reshape(4, 4, 64)
    f56 = 1.0 / 10000.0 ** (torch.arange(0, 56, 2, dtype=torch.float64) / 56)
    assert rel[..., :8].abs().max() == 0
    assert torch.allclose(rel[2, 3, 8:36], 2 * f56) and torch.allclose(rel[2, 3, 36:], 3 * f56)
    # rotating a pair: (1, 0) at fine row 1, col 0, first pair (frequency 1) -> (cos 1, sin 1)
    x = torch.zeros(1, 3 + 64, 32)
    x[0, 3 + 8, 0] = 1.0
    y = nami.apply_rope(x, fine.cos().float(), fine.sin().float())
    assert torch.allclose(y[0, 3 + 8, :2], torch.tensor([math.cos(1.0), math.sin(1.0)]), atol=1e-6)
    assert torch.allclose(y.norm(), x.norm())                  # rotations keep lengths


def test_real_rope_equals_the_complex_rotation():
    # the complex form (consecutive pairs as complex numbers times e^{i angle}), written here
    g = torch.Generator().manual_seed(0)
    ang = nami.rope_angles(nami.preset("cifar"), 2, 8, 8, 5)   # (69, 32)
    x = torch.randn(2, 6, 69, 64, generator=g)
    ref = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * torch.polar(torch.ones_like(ang), ang).to(torch.complex64))
    assert (nami.apply_rope(x, ang.cos().float(), ang.sin().float()) - ref.flatten(-2)).abs().max() < 1e-6


def test_sampler_shapes_variants_and_determinism():
    m = tiny_model()
    t, u = text(2), text(2, T=2, seed=5)
    for variant, steps in (("nami", (2, 2, 2)), ("piecewise", (1, 1, 1)), ("baseline", (3,))):
        out, ends = nami.sample(m, t, u, steps=steps, cfg_scale=2.0, variant=variant,
                                generator=torch.Generator().manual_seed(0))
        assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()
        again, _ = nami.sample(m, t, u, steps=steps, cfg_scale=2.0, variant=variant,
                               generator=torch.Generator().manual_seed(0))
        assert torch.equal(out, again)
    calls = count_block_calls(m, lambda: nami.sample(m, t, steps=(1, 1, 1)))
    assert calls == [0, 1] + [0, 1, 2, 3] + list(range(6))
    with pytest.raises(ValueError, match="one count per window"):
        nami.sample(m, t, steps=(10, 10))
    with pytest.raises(ValueError, match="divisible"):
        nami.sample(m, t, resolution=36)


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_window_conditioning_computed_at_once_equals_every_step_on_its_own(cfg_scale):
    # sample() computes a window's adaLN conditioning for all its steps in one call; here a
    # plain Euler loop that runs the whole model at every step (time through the model's
    # forward, CFG as two separate calls), with the sampler's own noise draws
    m = tiny_model(windows=(1, 1, 1))
    t, u = text(2), text(2, T=5, seed=5)
    steps = (2, 3, 4)
    out, _ = nami.sample(m, t, u, steps=steps, cfg_scale=cfg_scale, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    x = 2 * (2 * pool2(pool2(torch.randn(2, 3, 32, 32, generator=g))))    # start_noise: halved twice
    with torch.no_grad():
        for i, ((s, e), n) in enumerate(zip(m.cfg.bounds(), steps)):
            if i:
                z = torch.randn(2, 3, 2 * x.shape[-1], 2 * x.shape[-1], generator=g)
                x = nami.renoise(x, 1 - m.cfg.bounds()[i - 1][1], z)
            for sg, sg_next in zip(torch.linspace(s, e, n + 1)[:-1], torch.linspace(s, e, n + 1)[1:]):
                sig = torch.full((2,), float(sg))
                v = m(x, sig, t, stage=i + 1)
                if cfg_scale != 1.0:
                    vu = m(x, sig, u, stage=i + 1)
                    v = vu + cfg_scale * (v - vu)
                x = x + (sg_next - sg) * v
    assert torch.allclose(out, x, atol=1e-4), (out - x).abs().max()


# ---------------------------------------------------------------- loss

def test_exact_stage_split():
    # largest remainder, by hand: 192 x (4, 8, 1) / 13 = 59.08, 118.15, 14.77 -> 59, 118, 15
    assert nami.stage_counts(192, (4, 8, 1)) == [59, 118, 15]
    assert nami.stage_counts(8, (4, 8, 1)) == [2, 5, 1]            # 2.46, 4.92, 0.62
    assert nami.stage_counts(6, (1, 0, 1)) == [3, 0, 3] and nami.stage_counts(7, (1,)) == [7]
    assert nami.stage_counts(3, (1, 1, 10)) == [1, 1, 1]           # 0.25, 0.25, 2.5: every stage gets one
    g = torch.Generator().manual_seed(0)
    hits = torch.zeros(13, 3)
    for _ in range(3000):
        st = nami.assign_stages(13, (4, 8, 1), g)
        assert torch.bincount(st, minlength=4)[1:].tolist() == [4, 8, 1]   # the same shapes every step
        hits[torch.arange(13), st - 1] += 1
    # ... and every sample is equally likely at any stage: 4/13, 8/13, 1/13 (std error <= 0.009)
    assert (hits / 3000 - torch.tensor([4, 8, 1]) / 13).abs().max() < 0.045


def test_loss_is_unbiased_for_the_ratios_despite_rounding():
    # A zero model on a 1-px checkerboard x: Down(x) = 0, so stages 1 and 2 see pure noise
    # targets (E mse = 1) and stage 3 (window [0.5, 0] for 1:1:1) the target n - x / 0.5
    # (E mse = 1 + 4 = 5). Ratios 1:1:1 put 1/3 of the weight on each stage: E total = 7/3,
    # though a batch of 8 holds 3 / 3 / 2 samples (a per-sample mean would give 2.0).
    m = nami.NAMI(nami.preset("tiny", width=64, heads=2, windows=(1, 1, 1)))
    x = ((torch.arange(32)[:, None] + torch.arange(32)[None]) % 2 * 2.0 - 1).expand(8, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    totals = [nami.nami_loss(m, x, text(8, T=3), (1, 1, 1), generator=g)[0].item() for _ in range(400)]
    assert abs(sum(totals) / 400 - 7 / 3) < 0.02                  # std error ~0.002


def test_loss_of_zero_model_on_constant_images():
    # zero model: loss_k = E[target^2]. For a constant image c: Up(Down x) = x = c, so
    # target = ((1-s)c - (1-e)c)/(s-e) + n = n - c at every stage: E = 1 + c^2.
    cfg = nami.preset("tiny", width=64, heads=2)
    m = nami.NAMI(cfg)
    x = torch.full((600, 3, 32, 32), 0.5)
    t = text(600, T=3)
    total, per, counts = nami.nami_loss(m, x, t, (1, 1, 1), generator=torch.Generator().manual_seed(0))
    assert set(per) == {1, 2, 3} and sum(counts.values()) == 600
    for k, v in per.items():                             # 200 x >= 192 values per stage: 5 std errors
        assert abs(v.item() - 1.25) < 0.045
    assert total.item() == pytest.approx(sum(per[k].item() * counts[k] for k in per) / 600, rel=1e-5)
    w_total, _, _ = nami.nami_loss(m, x, t, (1, 1, 1), weights=(2, 0, 1), generator=torch.Generator().manual_seed(0))
    assert w_total.item() == pytest.approx((2 * per[1].item() * counts[1] + per[3].item() * counts[3]) / 600, rel=1e-5)
    # every sample trains exactly one stage: ratios must name every stage, no more, no fewer
    with pytest.raises(ValueError, match="one entry per stage"):
        nami.nami_loss(nami.NAMI(nami.preset("tiny", width=64, heads=2, baseline=True)), x[:8], t.select(slice(0, 8)), (4, 2, 1))


def test_sharded_loss_gradients_equal_the_full_batch_gradient():
    # what data parallelism relies on: the mean of the shards' gradients is the full gradient
    m = tiny_model()
    x, t = torch.randn(6, 3, 32, 32), text(6)
    native = torch.tensor([3, 2, 3, 1, 3, 3])
    grads = []
    for shard in [(0, 1), (0, 2), (1, 2)]:
        r, w = shard
        m.zero_grad()
        loss, _, _ = nami.nami_loss(m, x[r::w], t.select(slice(r, None, w)), (1, 1, 1), native=native[r::w],
                                    generator=torch.Generator().manual_seed(7), shard=shard)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], (grads[1] + grads[2]) / 2, atol=1e-6)
    assert grads[0].abs().max() > 0


def test_loss_trains_each_stage_with_its_own_depth():
    m = tiny_model(stage_layers=(2, 2, 2))
    x, t = torch.randn(8, 3, 32, 32), text(8)
    total, per, _ = nami.nami_loss(m, x, t, (1, 0, 0), generator=torch.Generator().manual_seed(0))
    assert set(per) == {1}
    total.backward()
    grads = [sum(p.grad.abs().sum().item() for p in b.parameters() if p.grad is not None) for b in m.blocks]
    assert all(gr > 0 for gr in grads[:2]) and all(gr == 0 for gr in grads[2:])
    heads = [sum(p.grad.abs().sum().item() for p in h.parameters() if p.grad is not None) for h in m.heads]
    assert heads[0] > 0 and heads[1] == heads[2] == 0


@pytest.mark.parametrize("name, double", [("tiny", 6), ("tiny", 2), ("cifar", 3)])
def test_every_weight_takes_part_in_the_loss(name, double):
    # DDP without an unused-parameter search, and FSDP's optimizer-state checkpoint, need every
    # weight in the graph: a full text stream in an all-double stack's top block would feed nothing
    m = nami.NAMI(nami.preset(name, width=32, heads=2, double=double))
    loss, per, _ = nami.nami_loss(m, torch.randn(12, 3, 32, 32), text(12), (1, 1, 1),
                                  generator=torch.Generator().manual_seed(0))
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None and not n.startswith("bridge.")]
    assert set(per) == {1, 2, 3} and missing == []


def test_loss_uses_native_resolution_only_downwards():
    m = nami.NAMI(nami.preset("tiny", width=64, heads=2))
    seen = []
    orig = m.forward
    m.forward = lambda x, sg, t, stage=None, depth=None: (seen.append((stage, len(x))), orig(x, sg, t, stage, depth))[1]
    native = torch.tensor([1] * 10 + [3] * 10)
    nami.nami_loss(m, torch.randn(20, 3, 32, 32), text(20), (1, 1, 1), native=native,
                   generator=torch.Generator().manual_seed(0))
    # stage-2/3 batches only contain the 10 full-resolution samples
    assert sum(n for k, n in seen if k > 1) <= 10 and sum(n for _, n in seen) == 20



def test_start_share_trains_at_the_window_start():
    # train.py's head start: share 1 at ratios 1:0:0 must put every sample at window 1's start,
    # sigma = 1, where the state is the noise alone. Images of constant 5 would shift the mean
    # of any state that still held data; the time fed must be window 1's t_start for all.
    cfg = nami.preset("tiny", width=64, heads=2)
    m, seen = nami.NAMI(cfg), []
    m.forward = lambda x, t, txt, stage=None, depth=None: (seen.append((stage, x, t)), torch.zeros_like(x))[1]
    nami.nami_loss(m, torch.full((64, 3, 32, 32), 5.0), text(64, T=3), (1, 0, 0),
                   generator=torch.Generator().manual_seed(0), start_share=1.0)
    (k, x1, t1), = [s for s in seen if len(s[1])]
    assert k == 1 and x1.shape == (64, 3, 8, 8)
    assert abs(x1.mean().item()) < 0.05 and abs(x1.std().item() - 1) < 0.05      # 12k draws: std error 0.009
    assert torch.all(t1 == nami.plan(cfg)[0].t_start) and nami.plan(cfg)[0].s == 1.0
    # share 1/4 at 1:1:1: a quarter of each stage's samples sit at their own window's start
    # (logit-normal draws never reach it exactly), and the rest spread over the window
    seen.clear()
    nami.nami_loss(m, torch.randn(3000, 3, 32, 32), text(3000, T=3), (1, 1, 1),
                   generator=torch.Generator().manual_seed(1), start_share=0.25)
    for win in nami.plan(cfg):
        (t,) = [s[2] for s in seen if s[0] == win.stage]
        at_start = (t == win.t_start).float().mean().item()
        assert abs(at_start - 0.25) < 0.04 and len(t) == 1000                  # std error 0.014
        assert (t < win.t_start).sum() > 600 and (t >= win.t_end).all()

# ---------------------------------------------------------------- built-in checks

def params_formula(cfg):
    """Parameter count written out per layer (independent of the module code)."""
    d, hid, pc, Dh = cfg.width, int(cfg.width * cfg.mlp_ratio), cfg.channels * cfg.patch ** 2, cfg.width // cfg.heads
    lin = lambda i, o: i * o + o
    stream = lin(d, 6 * d) + lin(d, 3 * d) + lin(d, d) + lin(d, hid) + lin(hid, d) + 2 * Dh
    single = lin(d, 3 * d) + lin(d, 3 * d + hid) + lin(d + hid, d) + 2 * Dh
    head = lin(d, 2 * d) + lin(d, pc)
    emb = lin(pc, d) + lin(cfg.text_dim, d) + lin(256, d) + lin(d, d) + lin(cfg.pooled_dim, d) + lin(d, d)
    C, sizes = cfg.channels, [cfg.resolution >> (cfg.K - k) for k in range(2, cfg.K + 1)]
    bridge = ((cfg.K - 1) * (4 * C * C + 4 * C + 16 * C * C) if cfg.bridge == "linear"
              else (cfg.K - 1) + sum(C * r * r for r in sizes))   # a scale per jump + a full-size shift
    top = lin(d, d) + lin(d, hid) + lin(hid, d) + lin(d, 4 * d) if cfg.double == cfg.depth else 0  # text: no proj, MLP, 4 of 6 mods
    heads = cfg.K if cfg.stage_heads else 1
    return emb + cfg.double * 2 * stream - top + (cfg.depth - cfg.double) * single + heads * head + bridge


@pytest.mark.parametrize("name, nominal", [("tiny", None), ("cifar", None), ("0.6b", 0.6e9), ("2b", 2.0e9)])
def test_preset_parameter_counts(name, nominal):
    cfg = nami.preset(name)
    n = nami.count_params(cfg)
    assert n == params_formula(cfg)
    if nominal:
        assert abs(n / nominal - 1) < 0.10
    base = nami.count_params(nami.preset(name, baseline=True))
    assert base < n                                      # baseline: one head, no bridge


def test_paper_table1_architectures():
    for name, w, depth, heads, ratio in (("0.6b", 1536, 12, 12, (5, 4, 3)), ("2b", 2048, 22, 16, (9, 7, 6))):
        cfg = nami.preset(name)
        assert (cfg.width, cfg.depth, cfg.heads, cfg.stage_layers) == (w, depth, heads, ratio)
        assert [cfg.stage_resolution(k) * 8 for k in (1, 2, 3)] == [256, 512, 1024]
        assert cfg.channels == 16 and cfg.windows == (1, 1, 1)


@pytest.mark.parametrize("name, stage, masked", [("tiny", 1, False), ("tiny", 3, True), ("cifar", 2, True), ("2b", 3, False)])
def test_analytic_flops_match_torch_counter(name, stage, masked):
    cfg = nami.preset(name)
    r = cfg.stage_resolution(stage)
    with torch.device("meta"):
        m = nami.NAMI(cfg)
        t = Text(torch.empty(1, cfg.text_len, cfg.text_dim), torch.ones(1, cfg.text_len, dtype=torch.bool) if masked else None,
                 torch.empty(1, cfg.pooled_dim))
        with FlopCounterMode(display=False) as fc:
            m(torch.empty(1, cfg.channels, r, r), torch.empty(1), t, stage=stage)
    assert nami.forward_flops(cfg, (r // cfg.patch) ** 2, cfg.stage_depth(stage)) == fc.get_total_flops()


def test_2b_flop_reduction_at_1024():
    cfg = nami.preset("2b")
    nami_f = nami.sampling_flops(cfg, (10, 10, 10), cfg_scale=4.0)
    base_f = nami.sampling_flops(cfg, 30, "baseline", cfg_scale=4.0)
    pw_f = nami.sampling_flops(cfg, (10, 10, 10), "piecewise", cfg_scale=4.0)
    assert 1 - nami_f / base_f > 0.55 and nami_f < pw_f < base_f


# ---------------------------------------------------------------- PPFlow, the patch pyramid

@pytest.mark.parametrize("fh, fw", [(1, 1), (2, 2), (1, 2)])
def test_ppflow_space_to_depth_is_exact_and_follows_ppflow(fh, fw):
    x = torch.randn(2, 3, 16, 16)
    B, C, H, W = x.shape
    # PPFlow's ChannelInvertibleSampling: down_square = pixel_unshuffle's (c, i, j) channel order,
    # down_w pairs along the width (c, j); then plain p x p patches (unfold)
    s2d = F.pixel_unshuffle(x, 2) if (fh, fw) == (2, 2) else \
        x.reshape(B, C, H, W // 2, 2).permute(0, 1, 4, 2, 3).reshape(B, 2 * C, H, W // 2) if fw == 2 else x
    expected = F.unfold(s2d, 4, stride=4).transpose(1, 2)
    tokens = nami.patchify(x, 4, fh, fw)
    assert torch.equal(tokens, expected)
    assert torch.equal(nami.unpatchify(tokens, C, H // (4 * fh), W // (4 * fw), 4, fh, fw), x)


def test_ppflow_coarse_embedding_starts_as_the_base_one():
    m = nami.NAMI(nami.preset("tiny", pp_levels=3))
    z = torch.randn(2, 3, 16, 16)                                  # a half-resolution image
    block = z.repeat_interleave(2, -1).repeat_interleave(2, -2)    # block-constant at 32 x 32
    with torch.no_grad():
        assert torch.allclose(m.level_in[0](nami.patchify(block, 4, 2, 2)), m.img_in(nami.patchify(z, 4)), atol=1e-6)
        w = torch.randn(2, 3, 32, 16)                              # half width -> 1 x 2 blocks
        assert torch.allclose(m.level_in[1](nami.patchify(w.repeat_interleave(2, -1), 4, 1, 2)),
                              m.img_in(nami.patchify(w, 4)), atol=1e-6)


def test_ppflow_levels_share_everything_but_embeddings_and_exits():
    pp = nami.NAMI(nami.preset("tiny", pp_levels=3)).state_dict()
    base = nami.NAMI(nami.preset("tiny", baseline=True)).state_dict()
    own = lambda k: k.startswith(("heads.", "level_in.", "level_emb", "bridge."))
    # the blocks, text and time conditioning and the base patch embedding: one copy, as the baseline's
    assert {k: v.shape for k, v in pp.items() if not own(k)} == {k: v.shape for k, v in base.items() if not own(k)}
    # per level: a patch embedding (the last level's is img_in), an exit, a row of the level embedding
    assert {k.rsplit(".", 1)[0] for k in pp if own(k) and pp[k].numel()} == {
        "level_in.0", "level_in.1", "level_emb", *(f"heads.{i}.{part}" for i in range(3) for part in ("mod", "linear"))}
    assert [pp[f"heads.{i}.linear.weight"].shape[0] for i in range(3)] == [4 * 48, 2 * 48, 48]   # C fh fw p p


class LineOracle(torch.nn.Module):
    """One flow at one resolution, x = (1 - sigma) x* + sigma n: v = dx/dsigma = (x - x*) / sigma."""

    def __init__(self, cfg, x_star):
        super().__init__()
        self.cfg, self.x_star, self.calls = cfg, x_star, []
        self.dummy = torch.nn.Parameter(torch.zeros((), dtype=x_star.dtype))

    def conditioning(self, t, pooled, stage, depth):
        return [t]       # the sampler computes a window's conditioning ahead: here, the time

    def forward(self, x, sigma, text, stage, depth, cond=None):
        sigma = sigma if cond is None else cond[0]
        self.calls.append((stage, depth, x.shape[-1]))
        return (x - self.x_star) / sigma.view(-1, 1, 1, 1).to(x.dtype)


@pytest.mark.parametrize("levels, nested", [(2, False), (3, False), (3, True)])
def test_oracle_ppflow_sampler_lands_on_the_data_point(levels, nested):
    cfg = nami.preset("tiny", pp_levels=levels, nested=nested)
    g = torch.Generator().manual_seed(3)
    x_star = torch.rand(2, 3, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
    oracle = LineOracle(cfg, x_star)
    steps = nami.default_steps(cfg)
    out, ends = nami.sample(oracle, text(2), steps=steps, generator=g)
    assert (out - x_star).abs().max() < 1e-6 and [e.shape[-1] for e in ends] == [32] * levels
    # no jump: Euler keeps (x - x*) / sigma = the start noise n fixed, so window 1 ends on the
    # straight path at sigma 0.5: 0.5 x* + 0.5 n
    g2 = torch.Generator().manual_seed(3)
    torch.rand(2, 3, 32, 32, generator=g2, dtype=torch.float64)
    n = torch.randn(2, 3, 32, 32, generator=g2, dtype=torch.float64)
    assert torch.allclose(ends[0], 0.5 * x_star + 0.5 * n, atol=1e-9)
    depths = [2, 4, 6] if nested else [6] * levels           # nested: level k runs its prefix
    assert oracle.calls == [(k, depths[k - 1], 32) for k in range(1, levels + 1) for _ in range(steps[k - 1])]
    assert steps == ((15, 15) if levels == 2 else (15, 8, 7))


@pytest.mark.parametrize("levels, stage", [(2, 1), (3, 2), (3, 3)])
def test_ppflow_flops_match_torch_counter(levels, stage):
    cfg = nami.preset("cifar", pp_levels=levels)
    merged = math.prod(cfg.patch_factors(stage))
    with torch.device("meta"):
        m = nami.NAMI(cfg)
        t = Text(torch.empty(1, cfg.text_len, cfg.text_dim), None, torch.empty(1, cfg.pooled_dim))
        with FlopCounterMode(display=False) as fc:
            m(torch.empty(1, 3, 32, 32), torch.empty(1), t, stage=stage)
    tokens = 16 * 16 // merged
    assert nami.forward_flops(cfg, tokens, cfg.stage_depth(stage), merged=merged) == fc.get_total_flops()
