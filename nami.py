"""
NAMI: progressive rectified flow transformers for text-to-image generation, in one file.

Paper: Ma, Cheng, Liu et al., "NAMI: Efficient Image Generation via Progressive Rectified
Flow Transformers" (arXiv 2503.09242), and its CVPR 2026 version which adds BridgeFlow.

The idea in three lines:
  1. Piecewise flow across resolutions: the rectified flow from noise to image is cut into
     K time windows; window k runs at resolution R / 2^(K-k) (K=3: 256 -> 512 -> 1024).
  2. Nested stage model: stage k runs only the first blocks of one transformer,
     theta_k = m_1 (+) ... (+) m_k, so low resolution means fewer tokens AND fewer layers.
  3. Multi-resolution joint training: every optimizer step trains all stages on one batch.
Adjacent windows are joined at jump points by "renoise" (nearest upsampling plus fresh
within-block noise, from Pyramid Flow) or by BridgeFlow (a fitted linear map per jump).

Read order (one "# ---" section each): notation -> presets -> flow math -> renoise jump ->
loss (`nami_loss`) -> sampler (`sample`) -> BridgeFlow -> model -> checks. The loss and the
sampler sit right after the math they use, before any model code; neither needs it read.

Notation (stated once; everything below uses the left column)
  this file            paper (Eq. 2-4)                 Pyramid Flow code
  -------------------  ------------------------------  -------------------------------
  sigma in [0, 1]      t (Eq. 2: t = noise weight)     sigma / "ratios" (1 - ...)
  sigma=1 noise, 0 data x0 noise, x1 data              same as ours
  x = (1-sigma) data + sigma noise                     x_t = t x0 + (1-t) x1
  v = dx/dsigma        x0 - x1 (Eq. 2's target)        noise - data
  stage k = 1..K       module m_k (Eq. 3 indexes       stage i = 0..K-1, high-res first
  (lowest res first)   Down by 2^(k+1): inverse)
  window k = [s_k, e_k] [t_{k-1}, t_k]                  (start_sigma, end_sigma)
  Down = 2x2 avg pool  Down(., 2)                      bilinear half-size resize
  Up = nearest x2      Up(., 2)                        nearest interpolate
Sampling integrates sigma from 1 down to 0; a window's start noise level s_k is larger
than its end e_k, and consecutive windows overlap (s_{k+1} > e_k): see window_bounds.

Use:  python nami.py          # preset table: parameters, sampling FLOPs, FLOP reduction
      python train.py ...     # trains (see README); python sample.py ...; python bench.py ...
      python -m pytest -q test_nami.py   # the flow equations, checked against closed forms
"""
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# -----------------------------------------------------------------------------
# Presets: plain data. Parameter counts are measured on the meta device by
# `python nami.py` and pinned by test_nami.py.


@dataclass
class Config:
    resolution: int = 32        # final (stage-K) input size: pixels, or latent cells for VAE presets
    channels: int = 3           # 3 = RGB pixels, 16 = FLUX/SD3-style VAE latents
    patch: int = 2              # patch side; tokens per image = (resolution / patch)^2 at stage K
    width: int = 256            # d
    heads: int = 4
    double: int = 2             # number of double-stream (MM-DiT) blocks; they come first
    stage_layers: tuple = (2, 2, 2)  # |m_1|, ..., |m_K|: depth = sum, K = len
    windows: tuple = (1, 1, 1)  # time-window ratio (fractions of the data weight 1 - sigma)
    nested: bool = True         # False = "piecewise flow only": every stage runs all blocks
    time_shift: bool = False    # SD3/FLUX resolution-dependent shift inside each window
    mlp_ratio: float = 4.0
    rope_theta: float = 10000.0
    text_dim: int = 384         # token width of the text encoder
    pooled_dim: int = 384       # width of its pooled vector
    text_len: int = 16          # typical prompt length in tokens (FLOP estimates, bench)
    text_encoder: str = "all-MiniLM-L6-v2"
    pooled_encoder: str = ""    # "" = pool the text encoder's own states
    vae: str = ""               # "" = pixel space

    @property
    def K(self):
        return len(self.stage_layers)

    @property
    def depth(self):
        return sum(self.stage_layers)

    def stage_resolution(self, k, resolution=None):
        """Input size at stage k (1..K): R / 2^(K-k)."""
        return (resolution or self.resolution) >> (self.K - k)

    def stage_depth(self, k):
        """Blocks run by stage k: the prefix m_1 (+) ... (+) m_k (all blocks if not nested)."""
        return sum(self.stage_layers[:k]) if self.nested else self.depth

    def check(self, resolution=None):
        """Clear, early errors for configurations the flow cannot run."""
        R, K = resolution or self.resolution, self.K
        unit = self.patch << (K - 1)
        if R % unit:
            raise ValueError(f"resolution {R} must be divisible by patch * 2^(K-1) = {unit} "
                             f"so every stage has whole patches; try {max(unit, R // unit * unit)}")
        if len(self.windows) != K:
            raise ValueError(f"windows {self.windows} needs one ratio per stage (K = {K})")
        if self.width % self.heads or (self.width // self.heads) % 4:
            raise ValueError(f"width {self.width} / heads {self.heads} must give a head dim "
                             f"divisible by 4 (2D RoPE rotates pairs on two axes)")
        if not 0 <= self.double <= self.depth:
            raise ValueError(f"double={self.double} must lie in [0, depth={self.depth}]")
        return self


# Paper Table 1: NAMI-0.6B 1536/12/12 with layer ratio 5:4:3, NAMI-2B 2048/22/16 with 9:7:6;
# K = 3 stages at 256/512/1024 px = 32/64/128 latent cells (8x VAE, 16 channels, patch 2).
# Block mix (the paper does not say): double-stream blocks first, as in FLUX (19 double +
# 38 single), as many as land the parameter count closest to the paper's stated size:
# 2b = 7 double + 15 single (2.04B; 6+16 = 1.95B, 8+14 = 2.13B), 0.6b = 3 + 9 (0.60B;
# 4+8 = 0.65B). Every stage then contains all double blocks (stage 1 has 9 and 5 layers),
# so even the cheapest stage keeps separate text and image weights; the nesting adds
# single blocks (15 d^2 parameters each vs 36 d^2).
PRESETS = {
    # Trains on 2 CPU cores in minutes on the shapes world (pixels, stages 8/16/32 = 4/16/64
    # tokens). Tuned for accuracy per CPU minute (README's record): width 256 or patch 2 cost
    # 2.7x / 1.8x more per step, so they see that many fewer images in 15 minutes. All six
    # blocks are double-stream (SD3-style MM-DiT): at width 128, separate text and image
    # weights (more parameters, the same FLOPs per token) was the largest single gain we
    # measured. MLP ratio 2 buys 25% more steps at no loss. Windows 2:1:1 give the cheap 8x8
    # layout stage half the flow (sigma 1 -> 0.5): it beat 1:1:1 and 1:1:2 in equal-time runs.
    "tiny": dict(resolution=32, channels=3, patch=4, width=128, heads=4, double=6,
                 stage_layers=(2, 2, 2), windows=(2, 1, 1), mlp_ratio=2.0),
    # CIFAR-size, DiT-S-like width/depth/heads (384/12/6) with the 0.6b layer ratio.
    "cifar": dict(resolution=32, channels=3, patch=2, width=384, heads=6, double=3,
                  stage_layers=(5, 4, 3)),
    "0.6b": dict(resolution=128, channels=16, patch=2, width=1536, heads=12, double=3,
                 stage_layers=(5, 4, 3), text_dim=2048, pooled_dim=768, text_len=256,
                 text_encoder="google/mt5-xl", pooled_encoder="openai/clip-vit-large-patch14",
                 vae="black-forest-labs/FLUX.1-schnell/vae"),
    "2b": dict(resolution=128, channels=16, patch=2, width=2048, heads=16, double=7,
               stage_layers=(9, 7, 6), text_dim=2048, pooled_dim=768, text_len=256,
               text_encoder="google/mt5-xl", pooled_encoder="openai/clip-vit-large-patch14",
               vae="black-forest-labs/FLUX.1-schnell/vae"),
}


def preset(name, **overrides):
    """Config for a preset; `baseline=True` turns it into the uniform FLUX-style baseline
    (one window, full depth, full resolution) with the same blocks, for like-for-like tests."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    kw = {**PRESETS[name], **overrides}
    if kw.pop("baseline", False):
        kw["stage_layers"] = (sum(kw["stage_layers"]),)
        kw["windows"] = (1,)
    return Config(**kw).check()


# Training recipes, also plain data (train.py reads them). The paper's (Sec. 3.3, 4.2) as
# phases: fractions of the run with resolution sampling ratios (stage 1:2:3, low to high) and
# a learning-rate multiplier; a multiplier (a, b) goes linearly from a to b over its phase.
PHASES = {
    # the paper: 120k steps at 4:2:1, 80k at 2:4:1, then 50k at 1:2:4 with the lr halved
    "paper": [(0.48, (4, 2, 1), 1.0), (0.80, (2, 4, 1), 1.0), (1.00, (1, 2, 4), 0.5)],
    # tiny's, measured on the shapes world (EXPERIMENTS.md): there stage 2 chooses the shapes
    # and stage 3 only sharpens them, while a stage-3 sample costs ~4x a stage-2 one and ~7x a
    # stage-1 one. The paper's phases spend 48-86% of the compute on stage 3; 4:8:1 spends
    # ~27% and scored 0.27 against 0.15 in equal-time runs. Its lr falls linearly to 0 over
    # the last 30% (halving it for the last 20% instead: 0.38 against 0.41)
    "tiny": [(0.70, (4, 8, 1), 1.0), (1.00, (4, 8, 1), (1.0, 0.0))],
}
# Defaults of `python train.py --preset P` (flags override). --dtype defaults to bf16 on GPUs,
# fp32 on CPUs. tiny's batch 192: at its 4:8:1 mix most samples train the cheap 8/16 px
# stages, where a CPU step is mostly per-operator overhead; 192 trains ~1.6x the images/s of
# 64. beta2 is AdamW's second-moment decay: tiny's 0.95 (a ~20-step memory instead of ~100)
# is what lets it take lr 5e-3; either change alone gained nothing (EXPERIMENTS.md).
TRAIN = {
    "tiny": dict(minutes=14.0, steps=None, batch_size=192, lr=5e-3, beta2=0.95, warmup=100, ema=0.995,
                 cfg=3.0, sample_steps="10,10,10", phases="tiny"),
    "cifar": dict(steps=100_000, batch_size=128, lr=3e-4, beta2=0.99, warmup=1000, ema=0.9999, cfg=2.0,
                  sample_steps="10,10,10", phases="paper"),
    "0.6b": dict(steps=250_000, batch_size=512, lr=1e-4, beta2=0.99, warmup=2000, ema=0.9999, cfg=4.0,
                 sample_steps="10,10,10", phases="paper"),
    "2b": dict(steps=250_000, batch_size=512, lr=1e-4, beta2=0.99, warmup=2000, ema=0.9999, cfg=4.0,
               sample_steps="10,10,10", phases="paper"),
}


# -----------------------------------------------------------------------------
# Piecewise-flow math: small pure functions on tensors (B, C, H, W).


def down(x, factor=2):
    """Down: average pooling, identical to a bilinear resize to exactly 1/factor size."""
    return F.avg_pool2d(x, factor) if factor > 1 else x


def up(x, factor=2):
    """Up: nearest-neighbour upsampling (copies each pixel into a factor x factor block)."""
    return F.interpolate(x, scale_factor=factor, mode="nearest") if factor > 1 else x


def window_bounds(ratios):
    """Noise levels [(s_k, e_k)] of the K time windows, s_k > e_k.

    Window ENDS sit on the grid given by the ratios, in data weight a = 1 - sigma:
    a_end(k) = (r_1 + ... + r_k) / sum(r). Each later window STARTS noisier, at
    a_start(k) = a_end(k-1) / (2 - a_end(k-1)): the data weight that survives the jump
    once Up() and fresh within-block noise restore i.i.d. noise (see renoise).
    K=3, 1:1:1 gives sigma windows [1, 2/3], [0.8, 1/3], [0.5, 0].
    """
    if not ratios or min(ratios) <= 0:
        raise ValueError(f"window ratios must be positive, got {ratios}")
    total, cum, bounds = float(sum(ratios)), 0.0, []
    for r in ratios:
        a_start = cum / (2 - cum)
        cum += r / total
        bounds.append((1 - a_start, 1 - min(cum, 1.0)))
    return bounds


def time_shift(u, shift):
    """SD3/FLUX time shift u -> s u / (1 + (s-1) u); s > 1 spends more time at high noise."""
    return shift * u / (1 + (shift - 1) * u)


def resolution_shift(tokens):
    """FLUX's resolution-dependent shift s = exp(mu), mu linear from (256, 0.5) to (4096, 1.15)."""
    return math.exp(0.5 + (1.15 - 0.5) * (tokens - 256) / (4096 - 256))


def logit_normal(n, generator=None, device="cpu", mean=0.0, std=1.0):
    """n draws of sigmoid(N(mean, std)): SD3's training-time distribution. Used for the
    fraction of a window's noise still left, u = 1 - r, so K = 1 is exactly SD3."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))


def training_point(x, noise, bounds, r):
    """Training point of one window. x: data at this stage's resolution (B,C,H,W); noise:
    unit Gaussian of the same shape, shared by both ends; bounds = (s, e); r: (B,) local time.

    start = (1-s) Up(Down(x)) + s noise     (stage 1 has s = 1: pure noise)
    end   = (1-e) x           + e noise     (last stage has e = 0: the data)
    x_r   = (1-r) start + r end,  sigma_r = (1-r) s + r e  (the true noise level of x_r)
    target = dx/dsigma = (start - end) / (s - e)

    Decision: the model is fed the true sigma_r, not a per-stage remapped time (Pyramid
    Flow), and predicts dx/dsigma, so one Euler rule serves every window and K = 1 is plain
    rectified flow (target = noise - data).
    """
    s, e = bounds
    r4 = r.view(-1, 1, 1, 1)
    start = (1 - s) * up(down(x)) + s * noise
    end = (1 - e) * x + e * noise
    xt = (1 - r4) * start + r4 * end
    sigma = (1 - r) * s + r * e
    return xt, sigma, (start - end) / (s - e)


# -----------------------------------------------------------------------------
# Jump points: stage k-1 ends at e = a x_{k-1} + (1-a) m (a = 1 - e_{k-1}, m unit noise at
# low resolution). Up(e) copies m into every 2x2 block, perfectly correlated; stage k was
# trained on starts (1-s_k) Up(x_{k-1}) + s_k n with n i.i.d. unit noise.


def block_detail(z):
    """z - Up(Down(z)): what a 2x2 block holds beyond its mean (zero sum per block,
    variance 3/4, within-block correlation -1/3)."""
    return z - up(down(z))


def renoise(e, a, z):
    """Jump from stage k-1 to k (Pyramid Flow's renoising, in closed form).

    e: (B,C,h,w) end point of stage k-1; a: its data weight 1 - e_{k-1}; z: (B,C,2h,2w)
    unit noise. Returns c Up(e) + s_k (z - Up(Down z)) with c = 1/(2-a), s_k = 1 - c a.
    Why: c Up(e) = c a Up(x) + c (1-a) Up(m) and i.i.d. unit noise n splits exactly into a
    block mean part Up(m)/2 (a mean of 4 unit values has std 1/2) plus block detail; so
    (1-s_k) n = c(1-a) Up(m) + s_k * detail requires c(1-a) = s_k/2, i.e. c = 1/(2-a). The
    output is then distributed exactly as stage k's training start (mean and covariance).
    """
    c = 1.0 / (2.0 - a)
    return c * up(e) + (1 - c * a) * block_detail(z)


# -----------------------------------------------------------------------------
# Text conditioning travels as one small tuple.


class Text(NamedTuple):
    tokens: torch.Tensor   # (B, T, text_dim) token states
    mask: torch.Tensor     # (B, T) bool, True = real token, False = padding; None = no padding
    pooled: torch.Tensor   # (B, pooled_dim)

    def select(self, idx):
        return Text(self.tokens[idx], None if self.mask is None else self.mask[idx], self.pooled[idx])

    def full_mask(self):
        return self.mask if self.mask is not None else torch.ones(
            self.tokens.shape[:2], dtype=torch.bool, device=self.tokens.device)

    def cat(self, other):
        """Batch two Texts, padding the shorter token list (masked out)."""
        T = max(self.tokens.shape[1], other.tokens.shape[1])
        pad = lambda t, v: F.pad(t, (0, 0) * (t.dim() - 2) + (0, T - t.shape[1]), value=v)
        both = self.mask is None and other.mask is None and self.tokens.shape[1] == T == other.tokens.shape[1]
        return Text(torch.cat([pad(self.tokens, 0.0), pad(other.tokens, 0.0)]),
                    None if both else torch.cat([pad(self.full_mask(), False), pad(other.full_mask(), False)]),
                    torch.cat([self.pooled, other.pooled]))


# -----------------------------------------------------------------------------
# Loss: multi-resolution joint training (paper Eq. 4 and Algorithm 1).


def assign_stages(u, ratios, native=None):
    """Stage (1..K) of each sample from uniform draws u (n,), with probabilities proportional
    to `ratios` (4:2:1 = mostly low resolution), by inverse CDF. native: (n,) highest stage
    each sample may serve (its native resolution): a sample is only used at stages <= that
    (paper Sec. 3.3), with the ratios renormalised over those stages."""
    K = len(ratios)
    p = torch.tensor(ratios, dtype=torch.float64, device=u.device).expand(len(u), K).clone()
    if native is not None:
        p[torch.arange(1, K + 1, device=u.device) > native.to(u.device)[:, None]] = 0
        if (p.sum(1) == 0).any():
            raise ValueError("a sample's native stage has zero ratio everywhere at or below it")
    cdf = p.cumsum(1) / p.sum(1, keepdim=True)
    return (u.double()[:, None] >= cdf[:, :-1]).sum(1) + 1


def nami_loss(model, x, text, ratios, weights=None, native=None, generator=None, shard=(0, 1)):
    """Multi-resolution joint loss (paper Eq. 4, Algorithm 1).

    x: (B,C,R,R) full-resolution images or latents in model space; text: Text for the batch;
    ratios: stage sampling ratios; weights: per-stage loss weights (default 1); native: (B,)
    highest stage each sample may serve. Each sample trains one stage, on Down(x) at that
    stage's size, through that stage's nested depth:
        total = (1/B) sum_i w_{k(i)} || v_theta_k(x_i) - target_i ||^2 / (C H W)
    so the ratios set each stage's share of the gradient and the weights rescale it.
    shard = (rank, world): x holds samples rank, rank + world, ... of a global batch. The
    random draws are made for the whole global batch and this shard takes its share, so
    averaging the ranks' gradients gives exactly the single-process gradient.
    Returns (total, {stage: mean MSE}, {stage: samples}) for the stages that got samples.
    """
    cfg, K = model.cfg, model.cfg.K
    if len(ratios) != K:                                  # else samples drawn for missing stages would be dropped
        raise ValueError(f"ratios {tuple(ratios)} need one entry per stage (K = {K})")
    rank, world = shard
    n, dev = len(x) * world, x.device
    draw = lambda t: t[rank::world]
    stage_of = assign_stages(draw(torch.rand(n, generator=generator, device=dev)), ratios, native)
    u = draw(logit_normal(n, generator, dev))            # noise fraction left in the window
    noise = draw(torch.randn((n,) + x.shape[1:], generator=generator, device=dev, dtype=x.dtype))
    bounds = window_bounds(cfg.windows)
    total, per_stage, counts = x.new_zeros(()), {}, {}
    for k in range(1, K + 1):
        idx = (stage_of == k).nonzero().squeeze(1)
        # a stage with no samples still runs (on an empty batch): every parameter gets a
        # gradient every step, so one process and N ranks (DDP, FSDP's collectives) agree
        xk = down(x[idx], 2 ** (K - k))                                   # (b, C, R_k, R_k)
        nk = noise[idx][..., : xk.shape[-2], : xk.shape[-1]]              # a crop of i.i.d. noise
        shift = resolution_shift((xk.shape[-1] // cfg.patch) ** 2) if cfg.time_shift else 1.0
        xt, sigma, target = training_point(xk, nk, bounds[k - 1], 1 - time_shift(u[idx], shift))
        pred = model(xt, sigma, text.select(idx), stage=k)
        mse = ((pred.float() - target.float()) ** 2).flatten(1).mean(1)   # (b,)
        w = 1.0 if weights is None else weights[k - 1]
        total = total + w * mse.sum() / len(x)
        if len(idx):
            per_stage[k], counts[k] = mse.detach().mean(), len(idx)
    return total, per_stage, counts


# -----------------------------------------------------------------------------
# Samplers: Euler over sigma within each window, jumps between windows.


def stage_plan(cfg, variant="nami"):
    """[(stage, s, e, depth)] the sampler walks through. Variants share the same weights:
      nami      K windows, stage k at its resolution with its nested depth
      piecewise K windows, full depth at every stage (the paper's "flow only" ablation)
      baseline  one window [1, 0] at full resolution and full depth (FLUX-style uniform)"""
    if variant == "baseline":
        return [(cfg.K, 1.0, 0.0, cfg.depth)]
    if variant not in ("nami", "piecewise"):
        raise ValueError(f"variant must be nami, piecewise or baseline, not {variant!r}")
    depth = lambda k: cfg.stage_depth(k) if variant == "nami" else cfg.depth
    return [(k, s, e, depth(k)) for k, (s, e) in enumerate(window_bounds(cfg.windows), 1)]


def parse_steps(s, K):
    """Euler steps per window for K windows: "10,10,10", or "10" for 10 in each. A K = 1
    (uniform baseline) model takes the sum of several counts: the same total as NAMI's."""
    steps = tuple(int(v) for v in str(s).split(","))
    if len(steps) == 1:
        steps = steps * K                                 # "10" = 10 per window
    elif K == 1:
        steps = (sum(steps),)
    if len(steps) != K:
        raise ValueError(f"steps {s} needs one count per window (K = {K})")
    if any(v < 1 for v in steps):
        raise ValueError(f"--steps needs positive counts, got {s}")
    return steps


def guided_velocity(model, x, sigma, text, uncond=None, scale=1.0, stage=None, depth=None):
    """Classifier-free guidance: v_u + scale (v_c - v_u), one batched forward pass."""
    if uncond is None:
        return model(x, sigma, text, stage, depth)
    v = model(torch.cat([x, x]), torch.cat([sigma, sigma]), text.cat(uncond), stage, depth)
    v_c, v_u = v.chunk(2)
    return v_u + scale * (v_c - v_u)


@torch.no_grad()
def sample(model, text, uncond=None, steps=(10, 10, 10), cfg_scale=1.0, transition="renoise",
           variant="nami", resolution=None, generator=None, noise=None, first=1, last=None):
    """Generate B images for the B prompts in `text` (uncond: the empty prompt, for CFG).

    steps: Euler steps per window (len K; one number for the baseline). transition:
    "renoise" or "bridge" (model.bridge). resolution: final size (default cfg.resolution).
    first, last: run only windows first..last, from `noise` = a state at window `first`'s
    start (real data noised to window k's start shows what stages k..K do on their own;
    BridgeFlow is fitted on the end points of single windows).
    Returns (images (B,C,R,R), [end point of each window run]) - the coarse-to-fine picture.
    The baseline variant with a K = 1 model is the plain uniform rectified-flow sampler.
    """
    cfg = model.cfg
    plan = stage_plan(cfg, variant)
    last = last or len(plan)
    if not 1 <= first <= last <= len(plan):
        raise ValueError(f"windows {first}..{last}: they are numbered 1..{len(plan)} for {variant}")
    plan = plan[first - 1: last]
    steps = (steps,) if isinstance(steps, int) else tuple(steps)
    if len(steps) != len(plan):
        raise ValueError(f"steps {steps} needs one count per window ({len(plan)} for {variant}"
                         + (f" from window {first})" if first > 1 else ")"))
    if first > 1 and noise is None:
        raise ValueError(f"starting in window {first} needs its start state as `noise`")
    if transition not in ("renoise", "bridge"):
        raise ValueError(f"transition must be renoise or bridge, not {transition!r}")
    R = resolution or cfg.resolution
    cfg.check(R)
    B, dev = text.pooled.shape[0], text.pooled.device
    uncond = None if (uncond is None or cfg_scale == 1.0) else uncond
    if text.mask is not None and bool(text.mask.all()):   # no padding: unmasked (flash) attention
        text = text._replace(mask=None)
    dtype = next(model.parameters()).dtype
    k0 = plan[0][0]
    size = cfg.stage_resolution(k0, R)
    x = noise if noise is not None else torch.randn(
        (B, cfg.channels, size, size), generator=generator, device=dev, dtype=dtype)
    bounds, ends = window_bounds(cfg.windows), []
    for i, (k, s, e, depth) in enumerate(plan):
        if i > 0:                                          # jump point: k-1 -> k
            z = torch.randn((B, cfg.channels, 2 * x.shape[-2], 2 * x.shape[-1]),
                            generator=generator, device=dev, dtype=x.dtype)
            a = 1 - bounds[k - 2][1]
            x = renoise(x, a, z) if transition == "renoise" else model.bridge(x, k, z)
        shift = resolution_shift((x.shape[-1] // cfg.patch) ** 2) if cfg.time_shift else 1.0
        u = time_shift(torch.linspace(1, 0, steps[i] + 1, dtype=torch.float64), shift)
        sigmas = (e + (s - e) * u).tolist()               # s -> e, spaced as in training
        for sg, sg_next in zip(sigmas[:-1], sigmas[1:]):
            sig = torch.full((B,), sg, device=dev, dtype=x.dtype)
            v = guided_velocity(model, x, sig, text, uncond, cfg_scale, k, depth)
            x = x + (sg_next - sg) * v.to(x.dtype)
        ends.append(x)
    return x, ends


# -----------------------------------------------------------------------------
# BridgeFlow (CVPR version): the learnable alternative to renoise at each jump point.


def to_blocks(x):
    """(B,C,2h,2w) -> (B,h,w,4C): each 2x2xC block as one vector."""
    return F.pixel_unshuffle(x, 2).permute(0, 2, 3, 1)


def from_blocks(b):
    """(B,h,w,4C) -> (B,C,2h,2w), inverse of to_blocks."""
    return F.pixel_shuffle(b.permute(0, 3, 1, 2), 2)


class BridgeFlow(nn.Module):
    """BridgeFlow (CVPR version): one learnable linear map per jump k-1 -> k,

        start_k = from_blocks( W e + b + G xi ),   xi ~ N(0, I) fresh, per 2x2 block,

    acting per low-resolution cell: W (4C x C) spreads the cell's C values over its 2x2xC
    block, b (4C) is a bias, G (4C x 4C) shapes fresh noise. The paper leaves open how a
    linear map supplies the high-frequency noise stage k was trained on: a map of Up(e)
    alone cannot (Up(e) is constant on blocks). Our design feeds it fresh noise xi.

    Pre-training objective (MSE, on coupled pairs from `bridge_pairs`):
        min_{W, b, V}  E || T - (W e + b + V xi) ||^2
    where T is stage k's training start built from the SAME data and noise as e, its
    high-frequency part drawn from xi. The map is linear, so `fit` solves this least-squares
    problem exactly (normal equations) instead of by gradient steps. Then
        G = (V V^T + Sigma_res)^(1/2),  Sigma_res = covariance of the residual,
    so Cov(output) = W Cov(e) W^T + V V^T + Sigma_res = Cov(T): what BridgeFlow hands stage k
    has the mean and covariance of what stage k saw in training, by construction.
    With pairs from the data the optimum is exactly `renoise` (test_nami checks this); fit
    on the model's own stage-(k-1) end points it also learns to correct their bias.
    Initialised to the renoise solution, so an unfitted bridge is already correct.
    """

    def __init__(self, channels, bounds):
        super().__init__()
        C, K = channels, len(bounds)
        self.W = nn.Parameter(torch.zeros(max(K - 1, 0), 4 * C, C))
        self.b = nn.Parameter(torch.zeros(max(K - 1, 0), 4 * C))
        self.G = nn.Parameter(torch.zeros(max(K - 1, 0), 4 * C, 4 * C))
        eye = torch.eye(C)
        P = torch.eye(4) - 0.25                           # block-detail projector on 4 positions
        for j in range(K - 1):                            # jump j+1 -> j+2
            a = 1 - bounds[j][1]
            c = 1.0 / (2.0 - a)
            with torch.no_grad():                         # channel-major block layout (pixel_unshuffle)
                self.W[j] = c * torch.kron(eye, torch.ones(4, 1))
                self.G[j] = (1 - c * a) * torch.kron(eye, P)

    def forward(self, e, k, xi):
        """e: (B,C,h,w) end of stage k-1; xi: (B,C,2h,2w) unit noise -> (B,C,2h,2w) start of stage k."""
        j = k - 2
        cells = e.permute(0, 2, 3, 1)                     # (B, h, w, C)
        out = cells @ self.W[j].T + self.b[j] + to_blocks(xi) @ self.G[j].T
        return from_blocks(out)

    @torch.no_grad()
    def fit(self, k, pairs):
        """Least-squares pre-training of jump k-1 -> k on an iterable of (e, xi, T) batches
        (shapes (B,C,h,w), (B,C,2h,2w), (B,C,2h,2w)); float64 normal equations, streamed."""
        j, C = k - 2, self.W.shape[-1]
        A = B = TT = None
        n = 0
        for e, xi, T in pairs:
            X = torch.cat([e.permute(0, 2, 3, 1).reshape(-1, C), to_blocks(xi).reshape(-1, 4 * C),
                           torch.ones(e.numel() // C, 1, device=e.device)], 1).double()
            Y = to_blocks(T).reshape(-1, 4 * C).double()
            A = X.T @ X if A is None else A + X.T @ X
            B = X.T @ Y if B is None else B + X.T @ Y
            TT = Y.T @ Y if TT is None else TT + Y.T @ Y
            n += len(X)
        coef = torch.linalg.solve(A, B)                   # (5C+1, 4C): [W^T; V^T; b]
        res = (TT - coef.T @ A @ coef) / n                # E[residual residual^T]
        W, V, b = coef[:C].T, coef[C:5 * C].T, coef[-1]
        evals, evecs = torch.linalg.eigh(V @ V.T + (res + res.T) / 2)
        G = evecs @ torch.diag(evals.clamp(min=0).sqrt()) @ evecs.T  # symmetric square root
        self.W[j].copy_(W)
        self.b[j].copy_(b)
        self.G[j].copy_(G)
        return float(torch.diagonal(res).mean())          # the fitted MSE per element


def bridge_pairs(x, k, bounds, generator=None, stage_end=None):
    """One batch of BridgeFlow pre-training pairs (e, xi, T) for the jump k-1 -> k.

    x: data at stage-k resolution (B,C,H,W). With m unit noise at stage k-1 and xi fresh:
      e = (1-e_{k-1}) Down(x) + e_{k-1} m           (stage k-1's training end point)
      T = (1-s_k) Up(Down(x)) + s_k n,  n = Up(m)/2 + (xi - Up(Down xi))
    n is i.i.d. unit noise whose block means are m/2: the coupling that makes T a function
    of (e, xi). stage_end(start, k-1), if given, replaces e by the model's own end point,
    sampled from stage k-1's training start built from the same Down(x) and m.
    """
    (s0, e0), (s1, _) = bounds[k - 2], bounds[k - 1]
    lo = down(x)
    m = torch.randn(lo.shape, generator=generator, device=x.device, dtype=x.dtype)
    xi = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    e = (1 - e0) * lo + e0 * m
    if stage_end is not None:
        e = stage_end((1 - s0) * up(down(lo)) + s0 * m, k - 1)
    T = (1 - s1) * up(lo) + s1 * (up(m) / 2 + block_detail(xi))
    return e, xi, T


# -----------------------------------------------------------------------------
# Model: FLUX-style MM-DiT (double-stream then single-stream blocks) with per-stage exits.


def sinusoidal(t, dim, max_period=10000.0):
    """[cos, sin] of t at dim/2 geometric frequencies (Transformer positions). (N,) -> (N, dim)"""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], -1)


def timestep_embedding(sigma, dim=256):
    """Sinusoidal embedding of sigma * 1000 (FLUX/DiT convention). (B,) -> (B, dim)"""
    return sinusoidal(1000.0 * sigma, dim)


def rope(h, w, stride, head_dim, theta, text_len, device):
    """2D rotary position embedding for [text; h x w image grid]: unit complex numbers
    (text_len + h*w, head_dim/2). Half the rotary pairs encode the row, half the column;
    text tokens get angle 0 (no rotation), as in FLUX.

    Decision: positions are measured on the final (stage-K) token grid. A stage-k token
    covers stride = 2^(K-k) final tokens and sits at their centre, i*stride + (stride-1)/2,
    so the same image location has the same rotary phase at every stage and what the
    shared blocks learn about "where" carries across resolutions."""
    q = head_dim // 4
    freqs = 1.0 / theta ** (torch.arange(q, device=device, dtype=torch.float64) / q)
    rows = torch.arange(h, device=device, dtype=torch.float64) * stride + (stride - 1) / 2
    cols = torch.arange(w, device=device, dtype=torch.float64) * stride + (stride - 1) / 2
    ang = torch.cat([(rows[:, None, None] * freqs).expand(h, w, q),
                     (cols[None, :, None] * freqs).expand(h, w, q)], -1).reshape(h * w, 2 * q)
    ang = F.pad(ang, (0, 0, text_len, 0)).float()
    return torch.polar(torch.ones_like(ang), ang)


def apply_rope(x, rot):
    """Rotate consecutive pairs of x (..., N, Dh) by rot (N, Dh/2), as complex products."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * rot).flatten(-2).type_as(x)


def attention(q, k, v, rot, mask):
    """Joint attention over [text; image] tokens. q,k,v: (B,H,N,Dh); rot: rotary factors
    for all N tokens; mask: (B,N) bool or None."""
    q, k = apply_rope(q, rot), apply_rope(k, rot)
    m = None if mask is None else mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    return out.transpose(1, 2).flatten(2)                  # (B, N, H*Dh)


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class QKNorm(nn.Module):
    """Per-head RMSNorm on queries and keys (keeps attention logits bounded)."""

    def __init__(self, head_dim):
        super().__init__()
        self.q = nn.Parameter(torch.ones(head_dim))
        self.k = nn.Parameter(torch.ones(head_dim))

    def forward(self, q, k):
        return (F.rms_norm(q, q.shape[-1:], self.q.to(q.dtype), 1e-6),
                F.rms_norm(k, k.shape[-1:], self.k.to(k.dtype), 1e-6))


class MLP(nn.Sequential):
    def __init__(self, d_in, d_hidden, d_out):
        super().__init__(nn.Linear(d_in, d_hidden), nn.GELU(approximate="tanh"), nn.Linear(d_hidden, d_out))


class DoubleBlock(nn.Module):
    """MM-DiT block: separate weights for the image and text streams, one joint attention.
    Parameters ~ 36 d^2 (two streams x (qkv 3 + proj 1 + mlp 8 + modulation 6) d^2).
    text_out=False for the top block of an all-double stack (SD3's "context_pre_only"):
    nothing reads the text after it, so its text stream stops after attention. Kept, those
    weights would never get a gradient (DDP stalls on them, FSDP cannot checkpoint them)."""

    def __init__(self, d, heads, mlp_ratio, text_out=True):
        super().__init__()
        self.heads, hidden, self.text_out = heads, int(d * mlp_ratio), text_out
        for s in ("img", "txt"):
            full = s == "img" or text_out     # else only (shift, scale) to feed attention
            setattr(self, f"{s}_mod", nn.Linear(d, (6 if full else 2) * d))
            setattr(self, f"{s}_qkv", nn.Linear(d, 3 * d))
            setattr(self, f"{s}_norm", QKNorm(d // heads))
            if full:
                setattr(self, f"{s}_proj", nn.Linear(d, d))
                setattr(self, f"{s}_mlp", MLP(d, hidden, d))

    def forward(self, img, txt, vec, rot, mask):
        im = self.img_mod(F.silu(vec)).chunk(6, -1)
        tm = self.txt_mod(F.silu(vec)).chunk(6 if self.text_out else 2, -1)
        qkv = []
        for s, x, m in (("txt", txt, tm), ("img", img, im)):
            h = modulate(F.layer_norm(x, x.shape[-1:], eps=1e-6), m[0], m[1])
            q, k, v = getattr(self, f"{s}_qkv")(h).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
            qkv.append((*getattr(self, f"{s}_norm")(q, k), v))
        q, k, v = (torch.cat(t, 2) for t in zip(*qkv))    # each (B, H, T + N, Dh): text first, then image
        a = attention(q, k, v, rot, mask)
        ta, ia = a[:, : txt.shape[1]], a[:, txt.shape[1]:]
        out = []
        for s, x, m, att in (("img", img, im, ia), ("txt", txt, tm, ta))[: 2 if self.text_out else 1]:
            x = x + m[2][:, None] * getattr(self, f"{s}_proj")(att)
            h = modulate(F.layer_norm(x, x.shape[-1:], eps=1e-6), m[3], m[4])
            out.append(x + m[5][:, None] * getattr(self, f"{s}_mlp")(h))
        return out if self.text_out else (out[0], None)


class SingleBlock(nn.Module):
    """Single-stream block over the concatenated sequence, attention and MLP in parallel
    (one d -> 3d + 4d input linear, one 5d -> d output linear). Parameters ~ 15 d^2."""

    def __init__(self, d, heads, mlp_ratio):
        super().__init__()
        self.heads, self.hidden = heads, int(d * mlp_ratio)
        self.mod = nn.Linear(d, 3 * d)
        self.linear1 = nn.Linear(d, 3 * d + self.hidden)
        self.linear2 = nn.Linear(d + self.hidden, d)
        self.norm = QKNorm(d // heads)

    def forward(self, x, vec, rot, mask):
        shift, scale, gate = self.mod(F.silu(vec)).chunk(3, -1)
        h = modulate(F.layer_norm(x, x.shape[-1:], eps=1e-6), shift, scale)
        qkv, mlp = self.linear1(h).split([3 * x.shape[-1], self.hidden], -1)
        q, k, v = qkv.unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        q, k = self.norm(q, k)
        a = attention(q, k, v, rot, mask)
        # linear2 over [attention, mlp] without materialising the (B, N, 5d) concatenation
        W, d = self.linear2.weight, x.shape[-1]
        out = F.linear(a, W[:, :d], self.linear2.bias) + F.linear(F.gelu(mlp, approximate="tanh"), W[:, d:])
        return x + gate[:, None] * out


class Head(nn.Module):
    """Exit of one stage: adaLN (shift, scale) then a linear map to patch values."""

    def __init__(self, d, out):
        super().__init__()
        self.mod = nn.Linear(d, 2 * d)
        self.linear = nn.Linear(d, out)

    def forward(self, x, vec):
        shift, scale = self.mod(F.silu(vec)).chunk(2, -1)
        return self.linear(modulate(F.layer_norm(x, x.shape[-1:], eps=1e-6), shift, scale))


class NAMI(nn.Module):
    """The nested stage model: one stack of blocks; stage k runs the prefix
    m_1 (+) ... (+) m_k at its resolution and exits through its own head.

    Decision: one exit head per stage (adaLN + linear, 2 d^2 parameters each, 1% of 2B):
    block L_k's output must both be read out as stage k's velocity and feed block L_k + 1
    at later stages; separate heads keep those two jobs apart. Patch embedding and the
    conditioning MLPs are shared. With K = 1 this is the uniform FLUX-style baseline.

    Decision: text tokens get a sinusoidal position added after their projection. Their
    rotary angle is 0 (as in FLUX), so without it joint attention sees the caption as a set
    of tokens and word order survives only inside the encoder's states; T5 keeps it well,
    a sentence encoder like MiniLM barely ("red" as subject vs object: cosine 0.94).
    """

    def __init__(self, cfg: Config):
        super().__init__()
        cfg.check()
        self.cfg, d, p = cfg, cfg.width, cfg.patch
        self.img_in = nn.Linear(cfg.channels * p * p, d)
        self.txt_in = nn.Linear(cfg.text_dim, d)
        self.time_in = MLP(256, d, d)
        self.vector_in = MLP(cfg.pooled_dim, d, d)
        self.blocks = nn.ModuleList(
            [DoubleBlock(d, cfg.heads, cfg.mlp_ratio, text_out=i + 1 < cfg.depth) for i in range(cfg.double)]
            + [SingleBlock(d, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth - cfg.double)])
        self.heads = nn.ModuleList([Head(d, cfg.channels * p * p) for _ in range(cfg.K)])
        self.bridge = BridgeFlow(cfg.channels, window_bounds(cfg.windows))
        self.grad_checkpointing = False
        self.init_weights()

    def init_weights(self):
        # DiT: xavier for linears, N(0, 0.02) for the conditioning MLPs, and zeros for every
        # modulation and the exits, so each block starts as the identity and the model as 0.
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.weight.device.type != "meta":
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        if self.img_in.weight.device.type == "meta":
            return
        for mlp in (self.time_in, self.vector_in):
            nn.init.normal_(mlp[0].weight, std=0.02)
            nn.init.normal_(mlp[2].weight, std=0.02)
        zero = [h.mod for h in self.heads] + [h.linear for h in self.heads]
        for blk in self.blocks:
            zero += [blk.img_mod, blk.txt_mod] if isinstance(blk, DoubleBlock) else [blk.mod]
        for m in zero:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x, sigma, text: Text, stage=None, depth=None):
        """x: (B,C,H,W) noisy input at stage `stage`'s resolution; sigma: (B,) its noise
        level; text: Text. depth overrides the stage's number of blocks (bench variants).
        Returns the predicted velocity dx/dsigma, (B,C,H,W)."""
        cfg, p = self.cfg, self.cfg.patch
        stage = cfg.K if stage is None else stage
        depth = cfg.stage_depth(stage) if depth is None else depth
        B, C, H, W = x.shape
        if H % p or W % p:
            raise ValueError(f"input {H}x{W} is not divisible by the patch size {p}")
        h, w = H // p, W // p
        img = self.img_in(x.unflatten(2, (h, p)).unflatten(4, (w, p)).permute(0, 2, 4, 1, 3, 5).flatten(3).flatten(1, 2))
        order = sinusoidal(torch.arange(text.tokens.shape[1], device=x.device), cfg.width)   # (T, d)
        txt = self.txt_in(text.tokens.to(img.dtype)) + order.to(img.dtype)                   # (B, T, d)
        vec = self.time_in(timestep_embedding(sigma).to(img.dtype)) + self.vector_in(text.pooled.to(img.dtype))
        rot = rope(h, w, 2 ** (cfg.K - stage), cfg.width // cfg.heads, cfg.rope_theta, txt.shape[1], x.device)
        mask = None if text.mask is None else F.pad(text.mask, (0, h * w), value=True)
        run = lambda blk, *a: checkpoint(blk, *a, use_reentrant=False) if self.grad_checkpointing and self.training else blk(*a)
        for blk in self.blocks[: min(depth, cfg.double)]:
            img, txt = run(blk, img, txt, vec, rot, mask)
        if depth > cfg.double:
            seq = torch.cat([txt, img], 1)                                    # (B, T + N, d)
            for blk in self.blocks[cfg.double: depth]:
                seq = run(blk, seq, vec, rot, mask)
            img = seq[:, txt.shape[1]:]
        out = self.heads[stage - 1](img, vec)                                 # (B, N, C p p)
        return out.unflatten(2, (C, p, p)).unflatten(1, (h, w)).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)


# -----------------------------------------------------------------------------
# Built-in checks: parameter counts and FLOPs (analytic, validated against torch's counter).


def count_params(cfg):
    """Parameters of the model (BridgeFlow included), built on the meta device: no memory."""
    with torch.device("meta"):
        return sum(p.numel() for p in NAMI(cfg).parameters())


def forward_flops(cfg, tokens, depth, text_len=None):
    """FLOPs (2 per multiply-add) of one forward pass for one image with `tokens` image
    tokens and `depth` blocks: every linear layer plus attention (QK^T and AV, 4 N^2 d)."""
    d, T = cfg.width, cfg.text_len if text_len is None else text_len
    hid, N, pc = int(d * cfg.mlp_ratio), tokens + T, cfg.channels * cfg.patch ** 2
    dbl, sgl = min(depth, cfg.double), max(depth - cfg.double, 0)
    mac = tokens * pc * d + T * cfg.text_dim * d + 256 * d + d * d + cfg.pooled_dim * d + d * d
    mac += dbl * (N * (4 * d * d + 2 * d * hid) + 2 * 6 * d * d)        # both streams, per token
    mac += sgl * (N * (d * (3 * d + hid) + (d + hid) * d) + 3 * d * d)
    mac += (dbl + sgl) * 2 * N * N * d                                   # attention
    if dbl == cfg.depth:                                                # top block: no text proj/MLP
        mac -= T * (d * d + 2 * d * hid) + 4 * d * d
    mac += 2 * d * d + tokens * d * pc                                  # exit head
    return 2 * mac


def sampling_flops(cfg, steps, variant="nami", resolution=None, cfg_scale=1.0, text_len=None):
    """Total FLOPs to sample one image: sum over windows of steps x forward FLOPs
    (x2 with classifier-free guidance)."""
    R, total = resolution or cfg.resolution, 0
    steps = (steps,) if isinstance(steps, int) else steps
    for (k, s, e, depth), n in zip(stage_plan(cfg, variant), steps):
        tokens = (cfg.stage_resolution(k, R) // cfg.patch) ** 2
        total += n * forward_flops(cfg, tokens, depth, text_len) * (1 if cfg_scale == 1.0 else 2)
    return total


if __name__ == "__main__":
    print(f"{'preset':>6} {'params':>8} {'stages (res)':>18} {'layers':>9} {'NAMI/base FLOPs':>16}")
    for name in PRESETS:
        cfg = preset(name)
        res = "/".join(str(cfg.stage_resolution(k)) for k in range(1, cfg.K + 1))
        steps = tuple([10] * cfg.K)
        ratio = sampling_flops(cfg, steps) / sampling_flops(cfg, 30, "baseline")
        print(f"{name:>6} {count_params(cfg) / 1e6:7.1f}M {res:>18} "
              f"{':'.join(map(str, cfg.stage_layers)):>9} {ratio:16.3f}")
