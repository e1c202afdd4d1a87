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
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torch.utils.weak import WeakIdKeyDictionary

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
    text_len: int = 16          # every caption is padded (or cut) to this many tokens, no mask
    text_encoder: str = "all-MiniLM-L6-v2"
    pooled_encoder: str = ""    # "" = pool the text encoder's own states
    vae: str = ""               # "" = pixel space
    # Choices where the released NAMI-2B differs from this file's own (README, "Decisions"):
    rope_axes: tuple = ()       # rotary dims per position id (index, row, col); () = (0, Dh/2, Dh/2)
    rope_grid: str = "final"    # "final": stage-k tokens sit where they cover the final grid; "stage": ids 0..h-1
    stage_heads: bool = True    # one exit per stage; False: one exit shared by all (the release)
    text_positions: bool = True # sinusoidal positions added to the text tokens (the release: none)
    timesteps: str = "sigma"    # model time: "sigma" (true noise level) or "pyramid" (the release, see plan)
    bridge: str = "linear"      # BridgeFlow: "linear" (W e + b + G xi) or "scale-shift" (the release)
    # PPFlow (Pyramidal Patchification Flow) instead of a resolution pyramid: 2 or 3 patch levels
    pp_levels: int = 0          # 0 = NAMI; else K = levels, all at full resolution (see patch_factors)

    @property
    def K(self):
        return len(self.stage_layers)

    @property
    def depth(self):
        return sum(self.stage_layers)

    def stage_resolution(self, k, resolution=None):
        """Input size at stage k (1..K): R / 2^(K-k); PPFlow's levels all see the full R."""
        return (resolution or self.resolution) >> (0 if self.pp_levels else self.K - k)

    def patch_factors(self, k):
        """(rows, cols) of base patches merged into one token at stage k. NAMI: (1, 1), its
        stages change resolution instead. PPFlow, as its code has it: the coarsest level
        merges 2x2 patches (4x fewer tokens), a 3-level model's middle level 1x2 (2x fewer,
        pairs along the width), the last level none."""
        if not self.pp_levels:
            return (1, 1)
        return [(2, 2), (1, 2), (1, 1)][k - 1] if self.K == 3 else [(2, 2), (1, 1)][k - 1]

    def stage_depth(self, k):
        """Blocks run by stage k: the prefix m_1 (+) ... (+) m_k (all blocks if not nested)."""
        return sum(self.stage_layers[:k]) if self.nested else self.depth

    def check(self, resolution=None):
        """Clear, early errors for configurations the flow cannot run."""
        R, K = resolution or self.resolution, self.K
        unit = self.patch << (1 if self.pp_levels else K - 1)
        if R % unit:
            raise ValueError(f"resolution {R} must be divisible by patch * 2^(K-1) = {unit} "
                             f"so every stage has whole patches; try {max(unit, R // unit * unit)}")
        if len(self.windows) != K:
            raise ValueError(f"windows {self.windows} needs one ratio per stage (K = {K})")
        if self.width % self.heads or (not self.rope_axes and (self.width // self.heads) % 4):
            raise ValueError(f"width {self.width} / heads {self.heads} must give a head dim "
                             f"divisible by 4 (2D RoPE rotates pairs on two axes)")
        if not 0 <= self.double <= self.depth:
            raise ValueError(f"double={self.double} must lie in [0, depth={self.depth}]")
        if sum(self.head_axes()) != self.width // self.heads or any(a % 2 for a in self.head_axes()):
            raise ValueError(f"rope_axes {self.rope_axes} must be even and sum to the head dim {self.width // self.heads}")
        for name, allowed in (("rope_grid", ("final", "stage")), ("timesteps", ("sigma", "pyramid")),
                              ("bridge", ("linear", "scale-shift"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: choose one of {allowed}")
        if self.time_shift and self.timesteps == "pyramid":
            raise ValueError("time_shift applies to timesteps='sigma' only (Pyramid Flow's scheduler has its own)")
        if self.pp_levels and (self.pp_levels not in (2, 3) or self.K != self.pp_levels or self.timesteps != "sigma"
                               or R % (2 * self.patch)):
            raise ValueError(f"pp_levels={self.pp_levels}: PPFlow has 2 or 3 levels, one stage each (stage_layers "
                             f"{self.stage_layers}), timesteps 'sigma', and a resolution divisible by 2 x patch")
        return self

    def head_axes(self):
        """Rotary dims per position axis (index, row, col) of one attention head."""
        half = (self.width // self.heads) // 2
        return tuple(self.rope_axes) or (0, half, half)

    def bounds(self):
        """Noise levels (s_k, e_k) of the K windows; Pyramid Flow's scheduler puts the window
        ends on its grid of 1000 timesteps, so the release's windows do too. PPFlow's levels
        split one flow at one resolution, so its windows meet without a jump."""
        if self.pp_levels:
            ends = [sum(self.windows[:k]) / sum(self.windows) for k in range(self.K + 1)]
            return [(1 - a, 1 - b) for a, b in zip(ends, ends[1:])]
        return window_bounds(self.windows, 1000 if self.timesteps == "pyramid" else None)


# The released NAMI-2B (360CVGroup/NAMI-T2I, weights qihoo360/NAMI-T2I) settles what the
# paper leaves open: 8 double-stream + 14 single-stream blocks at width 2048 (16 heads of
# 128), stage k cutting the single blocks at [1, 8, 14] (9 / 16 / 22 blocks = 9:7:6), one
# shared exit, FLUX's RoPE (axes 16/56/56, integer ids of each stage's own grid), mT5-XXL
# token states padded to 256 (4096 wide) plus the first token of HunyuanDiT's mCLIP (1024),
# Pyramid Flow's scheduler, and a scale-and-shift BridgeFlow. `2b` is that model; `0.6b`
# keeps the paper's Table 1 numbers (1536/12/12, 5:4:3) in the release's conventions, with
# the double/single mix that lands closest to 0.6B (3 + 9; 4 + 8 would be 0.65B).
RELEASE = dict(resolution=128, channels=16, patch=2, text_dim=4096, pooled_dim=1024, text_len=256,
               rope_axes=(16, 56, 56), rope_grid="stage", stage_heads=False, text_positions=False,
               timesteps="pyramid", bridge="scale-shift", text_encoder="google/mt5-xxl",
               pooled_encoder="Tencent-Hunyuan/HunyuanDiT/t2i/clip_text_encoder",
               vae="black-forest-labs/FLUX.1-schnell/vae")
PRESETS = {
    # Trains on 2 CPU cores in minutes on the shapes world (pixels, stages 8/16/32 = 4/16/64
    # tokens). Tuned for accuracy per CPU minute (EXPERIMENTS.md): width 256 or patch 2 cost
    # 2.7x / 1.8x more per step, so they see that many fewer images in 15 minutes. All six
    # blocks are double-stream (SD3-style MM-DiT): at width 128, separate text and image
    # weights (more parameters, the same FLOPs per token) was the largest single gain we
    # measured. MLP ratio 2 buys 25% more steps at no loss. Windows 1:2:1 give the 8 px stage
    # (2x2 tokens) only sigma 1 -> 0.75 and the 16 px stage 0.75 -> 0.25, where the layout is
    # decided: against 2:1:1, single 0.91 vs 0.77 and fewer extra objects (EXPERIMENTS.md, 7).
    # Captions of the shapes world are at most 14 MiniLM tokens.
    "tiny": dict(resolution=32, channels=3, patch=4, width=128, heads=4, double=6,
                 stage_layers=(2, 2, 2), windows=(1, 2, 1), mlp_ratio=2.0, text_len=14),
    # CIFAR-size, DiT-S-like width/depth/heads (384/12/6) with the 0.6b layer ratio.
    "cifar": dict(resolution=32, channels=3, patch=2, width=384, heads=6, double=3,
                  stage_layers=(5, 4, 3)),
    "0.6b": dict(RELEASE, width=1536, heads=12, double=3, stage_layers=(5, 4, 3)),
    "2b": dict(RELEASE, width=2048, heads=16, double=8, stage_layers=(9, 7, 6)),
}


def preset(name, **overrides):
    """Config for a preset. `baseline=True` turns it into the uniform FLUX-style baseline
    (one window, full depth, full resolution) with the same blocks, for like-for-like tests.
    `pp_levels=2|3` into PPFlow with the same blocks: its windows (sigma 1 -> 0.5 -> 0, or
    1 -> 0.5 -> 0.25 -> 0), every level running all blocks unless `nested=True` (then level
    k runs its prefix, as NAMI's stages: stage_layers splits the blocks as evenly as can be)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    kw = {**PRESETS[name], **overrides}
    depth = sum(kw.get("stage_layers", Config.stage_layers))
    if kw.pop("baseline", False):
        kw["stage_layers"] = (depth,)
        kw["windows"] = (1,)
    if kw.get("pp_levels"):
        L = kw["pp_levels"]
        kw["windows"] = overrides.get("windows", (1, 1) if L == 2 else (2, 1, 1))
        kw["stage_layers"] = overrides.get("stage_layers", tuple(depth // L + (k < depth % L) for k in range(L)))
        kw["nested"] = overrides.get("nested", False)
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
# Defaults of `python train.py --preset P` (flags override). --dtype defaults to bf16 autocast
# on GPUs and on CPUs with bf16 instructions (runs.train_dtype), fp32 elsewhere. tiny's 3,300
# steps: the same model for everyone. The first 22% (733 steps) are a head start, stage 1 alone
# at pure noise on position captions: the joint loss almost never trains window 1's very start,
# where a sample's layout is chosen, and without it relations stay at chance (EXPERIMENTS.md
# 7(e)-(g)). After it, start_share 0.1 of the samples train at their window's start too:
# logit-normal times put 1.4% of them in the top tenth of a window, where each window's first
# sampler step starts (overall 0.491 against 0.473, position 0.43 against 0.39, 4 training seeds
# x 3 evals; EXPERIMENTS.md 7(h)). The joint steps draw the caption forms single : counting :
# two objects : position at 1:2:2:2, not uniformly: single objects are learnt early (0.91) and
# the multi-object forms lag (0.33-0.43), so they get the samples (overall 0.547 over 7 runs x 3
# evals, against 0.491 over 4 x 3; EXPERIMENTS.md 0, 7(i)). Sampling them with guidance 4
# instead of 3 raises overall at 6 of those 7 runs (0.557 against 0.547; EXPERIMENTS.md 6).
# 3,300 steps, not 2,700: at 2,700 one run in seven fell in a weak mode (overall 0.497), and
# so did the first with the eighth session's faster step (0.474); at 3,300 the worst of eight
# scored 0.538, and the same seven runs 0.595 against 0.557 (EXPERIMENTS.md 0, 7(j)), for ~2.3
# min more. Nor 3,000: one seed in four scored 0.483 there. 8.5-13.8 min on 2 CPU cores
# (bf16; an AMD EPYC, an Intel Xeon) from an empty inductor cache, 1.5-2.7 min of it compiling
# the joint step (the head start runs eager, train.py). Its batch 192: at its 4:8:1 mix most
# samples train the cheap 8/16 px stages, where a small batch leaves a CPU step mostly
# per-operator overhead; 192 trains ~1.6x the images/s of 64 (at 192, packing the stages into
# one pass over the blocks gains nothing: the cost is per token, EXPERIMENTS 10).
# beta2 is AdamW's second-moment decay: tiny's 0.95 (a ~20-step memory instead of ~100) is
# what lets it take lr 5e-3; either change alone gained nothing (EXPERIMENTS.md).
TRAIN = {
    "tiny": dict(steps=3300, minutes=None, batch_size=192, lr=5e-3, beta2=0.95, warmup=100, ema=0.995,
                 cfg=4.0, sample_steps="10,10,10", phases="tiny", compile=True,
                 head_start=0.2222, head_start_data="shapes:forms=0:0:0:1", start_share=0.1,
                 data="shapes:forms=1:2:2:2"),
    "cifar": dict(steps=100_000, batch_size=128, lr=3e-4, beta2=0.99, warmup=1000, ema=0.9999, cfg=2.0,
                  sample_steps="10,10,10", phases="paper", compile=False, data="shapes"),
    "0.6b": dict(steps=250_000, batch_size=512, lr=1e-4, beta2=0.99, warmup=2000, ema=0.9999, cfg=3.0,
                 sample_steps="10,10,10", phases="paper", compile=False, data="shapes"),
    "2b": dict(steps=250_000, batch_size=512, lr=1e-4, beta2=0.99, warmup=2000, ema=0.9999, cfg=3.0,
               sample_steps="10,10,10", phases="paper", compile=False, data="shapes"),   # the release: 10/10/10, CFG 3
}


# -----------------------------------------------------------------------------
# Piecewise-flow math: small pure functions on tensors (B, C, H, W).


def down(x, factor=2):
    """Down: average pooling, identical to a bilinear resize to exactly 1/factor size."""
    return F.avg_pool2d(x, factor) if factor > 1 else x


def up(x, factor=2):
    """Up: nearest-neighbour upsampling (copies each pixel into a factor x factor block)."""
    return F.interpolate(x, scale_factor=factor, mode="nearest") if factor > 1 else x


def window_bounds(ratios, grid=None):
    """Noise levels [(s_k, e_k)] of the K time windows, s_k > e_k.

    Window ENDS sit on the grid given by the ratios, in data weight a = 1 - sigma:
    a_end(k) = (r_1 + ... + r_k) / sum(r), rounded down to a multiple of 1/grid if given.
    Each later window STARTS noisier, at a_start(k) = a_end(k-1) / (2 - a_end(k-1)): the data
    weight that survives the jump once Up() and fresh within-block noise restore i.i.d. noise
    (see renoise; Pyramid Flow's gamma = 1/3 correction is the same formula).
    K=3, 1:1:1 gives sigma windows [1, 2/3], [0.8, 1/3], [0.5, 0].
    """
    if not ratios or min(ratios) <= 0:
        raise ValueError(f"window ratios must be positive, got {ratios}")
    total, cum, a_end, bounds = float(sum(ratios)), 0.0, 0.0, []
    for k, r in enumerate(ratios):
        a_start = a_end / (2 - a_end)
        cum += r / total
        a_end = 1.0 if k == len(ratios) - 1 else math.floor(cum * grid) / grid if grid else cum
        bounds.append((1 - a_start, 1 - a_end))
    return bounds


def pyramid_times(bounds, T=1000):
    """Pyramid Flow's scheduler (the release's): the K windows share the global timesteps
    T .. 1 in proportion to their flow lengths s_k - e_k, on an integer grid; the model is
    fed timestep / T. Returns [(t_start, t_end)] per window, in units of T."""
    lengths = [s - e for s, e in bounds]
    cum = [sum(lengths[:k]) / sum(lengths) for k in range(len(bounds) + 1)]
    return [((T - math.floor(T * cum[k])) / T, (T - min(math.floor(T * cum[k + 1]), T - 1)) / T)
            for k in range(len(bounds))]


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


def training_point(x, noise, bounds, r, jump=True):
    """Training point of one window. x: data at this stage's resolution (B,C,H,W); noise:
    unit Gaussian of the same shape, shared by both ends; bounds = (s, e); r: (B,) local time.

    start = (1-s) Up(Down(x)) + s noise     (stage 1 has s = 1: pure noise)
    end   = (1-e) x           + e noise     (last stage has e = 0: the data)
    x_r   = (1-r) start + r end,  sigma_r = (1-r) s + r e  (the true noise level of x_r)
    target = dx/dsigma = (start - end) / (s - e)
    jump=False (PPFlow's levels, one flow at one resolution): start = (1-s) x + s noise, so
    every window is a piece of the same straight path and the target is noise - data.
    What the model is fed and predicts in terms of these is set by its Window (plan).
    """
    s, e = bounds
    r4 = r.view(-1, 1, 1, 1)
    start = (1 - s) * (up(down(x)) if jump else x) + s * noise
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


def stage_counts(n, ratios):
    """Samples per stage in a batch of n: exactly proportional to `ratios` up to rounding
    (largest remainder), at least one for every stage with a positive ratio if n allows."""
    quota = [n * r / sum(ratios) for r in ratios]
    counts = [math.floor(q) for q in quota]
    for k in sorted(range(len(ratios)), key=lambda k: counts[k] - quota[k])[: n - sum(counts)]:
        counts[k] += 1
    for k in range(len(ratios)):
        if ratios[k] > 0 and counts[k] == 0 and max(counts) > 1:
            counts[counts.index(max(counts))] -= 1
            counts[k] = 1
    return counts


def assign_stages(n, ratios, generator=None, device="cpu"):
    """Stage (1..K) of each of n samples: exactly `stage_counts(n, ratios)` samples per stage
    in a random order, so every stage's batch has the same size at every step (one compiled
    graph per stage) and every sample is equally likely to land at any stage."""
    order = torch.randperm(n, generator=generator, device=device)
    stage = torch.empty(n, dtype=torch.long, device=device)
    stage[order] = torch.repeat_interleave(torch.arange(1, len(ratios) + 1, device=device),
                                           torch.tensor(stage_counts(n, ratios), device=device))
    return stage


def nami_loss(model, x, text, ratios, weights=None, native=None, generator=None, shard=(0, 1), start_share=0.0):
    """Multi-resolution joint loss (paper Eq. 4, Algorithm 1).

    x: (B,C,R,R) full-resolution images or latents in model space; text: Text for the batch;
    ratios: stage sampling ratios; weights: per-stage loss weights (default 1); native: (B,)
    highest stage each sample may serve (paper Sec. 3.3: a sample drawn for a higher stage
    trains its native one instead). Each sample trains one stage, on Down(x) at that
    stage's size, through that stage's nested depth, at a local time l (the fraction of the
    window's noise still left) drawn logit-normal as in SD3:
        total = (1/B) sum_i c_k w_k || v_theta_k(x_i(l_i), t_k(l_i)) - target_i ||^2 / (C H W)
    Stage k gets n_k = stage_counts(B, ratios)[k] samples, and c_k = (B r_k / sum r) / n_k
    undoes the rounding, so the loss is an unbiased estimate of the ratio-weighted objective.
    shard = (rank, world): x holds samples rank, rank + world, ... of a global batch. The
    random draws are made for the whole global batch and this shard takes its share, so
    averaging the ranks' gradients gives exactly the single-process gradient.
    start_share: the fraction of samples trained at their window's start (l = 1) instead of a
    logit-normal l. Window 1 starts at pure noise, where a sample's layout is chosen, and
    logit-normal draws almost never reach it; train.py's head start uses share 1 (EXPERIMENTS.md 7(f)).
    Returns (total, {stage: mean MSE}, {stage: samples}) for the stages that got samples.
    In one process a stage the ratios give no samples is skipped, so its own parameters get
    no gradient (None); train.py fills those with zeros, which is what an empty batch gives.
    """
    cfg, K = model.cfg, model.cfg.K
    if len(ratios) != K:                                  # else samples drawn for missing stages would be dropped
        raise ValueError(f"ratios {tuple(ratios)} need one entry per stage (K = {K})")
    rank, world = shard
    n, dev = len(x) * world, x.device
    draw = lambda t: t[rank::world]
    stage_of = draw(assign_stages(n, ratios, generator, dev))
    if native is not None:                                # a sample serves only stages <= its native one
        stage_of = torch.minimum(stage_of, native.to(dev))
    u = draw(logit_normal(n, generator, dev))            # noise fraction left in the window
    if start_share:                                       # (share 0 leaves every draw as it was)
        u = torch.where(draw(torch.rand(n, generator=generator, device=dev)) < start_share, torch.ones_like(u), u)
    noise = draw(torch.randn((n,) + x.shape[1:], generator=generator, device=dev, dtype=x.dtype))
    counts_plan = stage_counts(n, ratios)
    total, per_stage, counts = x.new_zeros(()), {}, {}
    for win in plan(cfg):
        k = win.stage
        if counts_plan[k - 1] == 0 and world == 1:
            continue      # e.g. stages 2-3 in train.py's head start: no graph, no compiling
        idx = (stage_of == k).nonzero().squeeze(1)
        # over N ranks a stage with no samples on this rank still runs (on an empty batch), so
        # every rank reaches DDP's and FSDP's collectives for every parameter
        xk = down(x[idx], 2 ** (K - k))                                   # (b, C, R_k, R_k)
        nk = noise[idx][..., : xk.shape[-2], : xk.shape[-1]]              # a crop of i.i.d. noise
        shift = resolution_shift((xk.shape[-1] // cfg.patch) ** 2) if cfg.time_shift else 1.0
        local = time_shift(u[idx], shift)                                 # (b,) l: 1 = window start
        xt, _, v = training_point(xk, nk, (win.s, win.e), 1 - local, jump=not cfg.pp_levels)
        pred = model(xt, win.time(local), text.select(idx), stage=k)
        target = v * ((win.s - win.e) / win.unit)                         # dx/dl = unit * prediction
        mse = ((pred.float() - target.float()) ** 2).flatten(1).mean(1)   # (b,)
        c = (n * ratios[k - 1] / sum(ratios)) / max(counts_plan[k - 1], 1)
        w = 1.0 if weights is None else weights[k - 1]
        total = total + c * w * mse.sum() / len(x)
        if len(idx):
            per_stage[k], counts[k] = mse.detach().mean(), len(idx)
    return total, per_stage, counts


# -----------------------------------------------------------------------------
# Samplers: Euler inside each window, jumps between windows.


class Window(NamedTuple):
    """One window of the sampler's plan. Inside it the state moves from the window's start
    (local time l = 1, noise level s) to its end (l = 0, noise level e); the model at stage
    `stage` runs `depth` blocks and is fed the time t_end + l (t_start - t_end), and its output
    v gives dx/dl = unit * v. Two conventions (Config.timesteps):
      sigma    t = the true noise level (t_start = s, t_end = e), v = dx/dsigma (unit = s - e):
               one Euler rule for every window, and K = 1 is plain rectified flow (FLUX, SD3)
      pyramid  t = Pyramid Flow's global timestep / 1000 (pyramid_times), v = start - end of
               the window (unit = 1): how the released NAMI-2B was trained and is sampled"""
    stage: int
    s: float
    e: float
    depth: int
    t_start: float
    t_end: float
    unit: float

    def time(self, local):
        return self.t_end + local * (self.t_start - self.t_end)


def plan(cfg, variant="nami"):
    """[Window] the sampler walks through. Variants share the same weights:
      nami      K windows, stage k at its resolution with its nested depth
      piecewise K windows, full depth at every stage (the paper's "flow only" ablation)
      baseline  one window [1, 0] at full resolution and full depth (FLUX-style uniform)"""
    if variant not in ("nami", "piecewise", "baseline"):
        raise ValueError(f"variant must be nami, piecewise or baseline, not {variant!r}")
    bounds = [(1.0, 0.0)] if variant == "baseline" else cfg.bounds()
    stages = [cfg.K] if variant == "baseline" else range(1, cfg.K + 1)
    times = pyramid_times(bounds) if cfg.timesteps == "pyramid" else bounds
    return [Window(k, s, e, cfg.stage_depth(k) if variant == "nami" else cfg.depth, t0, t1,
                   1.0 if cfg.timesteps == "pyramid" else s - e)
            for k, (s, e), (t0, t1) in zip(stages, bounds, times)]


def local_grid(cfg, win, steps, tokens):
    """Local times 1 = l_0 > ... > l_steps = 0 of a window's Euler steps. sigma: uniform, or
    with FLUX's resolution shift (time_shift) for `tokens` image tokens, spaced as in
    training. pyramid: the released scheduler's grid, uniform down to one global timestep
    (1/1000) above the window's end, then one last step onto it."""
    u = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    if cfg.timesteps == "pyramid":
        u[:-1] = torch.linspace(1, 0.001 / (win.t_start - win.t_end), steps, dtype=torch.float64)
    elif cfg.time_shift:
        u = time_shift(u, resolution_shift(tokens))
    return u.tolist()


def default_steps(cfg, total=30):
    """Euler steps per window for `total` steps: NAMI splits them evenly (10/10/10, the
    paper); PPFlow's levels in proportion to their share of the flow (its uniform time grid:
    15/15, 15/8/7)."""
    w = [s - e for s, e in cfg.bounds()] if cfg.pp_levels else [1] * cfg.K
    return tuple(stage_counts(total, w))


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


def guided_velocity(model, x, t, text, uncond=None, scale=1.0, stage=None, depth=None, cond=None):
    """Classifier-free guidance: v_u + scale (v_c - v_u), one batched forward pass. cond: the
    model's conditioning for the batch (text, then uncond), when computed ahead (sample)."""
    if uncond is None:
        return model(x, t, text, stage, depth, cond)
    v = model(torch.cat([x, x]), torch.cat([t, t]), text.cat(uncond), stage, depth, cond)
    v_c, v_u = v.chunk(2)
    return v_u + scale * (v_c - v_u)


def start_noise(cfg, B, R, size, generator=None, device="cpu", dtype=torch.float32):
    """The first window's pure noise at `size`, drawn as the release does: full-resolution
    unit noise, 2x2-averaged (= bilinear halving) and doubled per halving, which is again
    i.i.d. unit noise (a mean of 4 unit values has std 1/2) and ties all stages to one draw."""
    z = torch.randn((B, cfg.channels, R, R), generator=generator, device=device, dtype=dtype)
    while z.shape[-1] > size:
        z = 2 * down(z)
    return z


@torch.no_grad()
def sample(model, text, uncond=None, steps=(10, 10, 10), cfg_scale=1.0, transition="renoise",
           variant="nami", resolution=None, generator=None, noise=None, first=1, last=None):
    """Generate B images for the B prompts in `text` (uncond: the empty or negative prompt, for CFG).

    steps: Euler steps per window (len K; one number for the baseline). transition:
    "renoise" or "bridge" (model.bridge). resolution: final size (default cfg.resolution).
    first, last: run only windows first..last, from `noise` = a state at window `first`'s
    start (real data noised to window k's start shows what stages k..K do on their own;
    BridgeFlow is fitted on the end points of single windows).
    Returns (images (B,C,R,R), [end point of each window run]) - the coarse-to-fine picture.
    The baseline variant with a K = 1 model is the plain uniform rectified-flow sampler.
    """
    cfg = model.cfg
    windows = plan(cfg, variant)
    last = last or len(windows)
    if not 1 <= first <= last <= len(windows):
        raise ValueError(f"windows {first}..{last}: they are numbered 1..{len(windows)} for {variant}")
    windows = windows[first - 1: last]
    steps = (steps,) if isinstance(steps, int) else tuple(steps)
    if len(steps) != len(windows):
        raise ValueError(f"steps {steps} needs one count per window ({len(windows)} for {variant}"
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
    pooled = text.pooled if uncond is None else torch.cat([text.pooled, uncond.pooled])   # a forward's batch
    rows = lambda c, a, n: tuple(m[a: a + n] for m in c) if isinstance(c, tuple) else c[a: a + n]
    x = noise if noise is not None else start_noise(
        cfg, B, R, cfg.stage_resolution(windows[0].stage, R), generator, dev, dtype)
    ends = []
    for i, win in enumerate(windows):
        if i > 0 and not cfg.pp_levels:                    # jump point: k-1 -> k (PPFlow has none)
            z = torch.randn((B, cfg.channels, 2 * x.shape[-2], 2 * x.shape[-1]),
                            generator=generator, device=dev, dtype=x.dtype)
            x = renoise(x, 1 - windows[i - 1].e, z) if transition == "renoise" else model.bridge(x, win.stage, z)
        grid = local_grid(cfg, win, steps[i], (x.shape[-1] // cfg.patch) ** 2)
        # the conditioning of all the window's steps in one call (rows: step-major, then batch)
        times = torch.tensor([win.time(l) for l in grid[:-1]], device=dev, dtype=x.dtype).repeat_interleave(len(pooled))
        conds = model.conditioning(times, pooled.repeat(steps[i], 1), win.stage, win.depth)
        for j, (l, l_next) in enumerate(zip(grid[:-1], grid[1:])):
            t = torch.full((B,), win.time(l), device=dev, dtype=x.dtype)
            cond = [rows(c, j * len(pooled), len(pooled)) for c in conds]
            v = guided_velocity(model, x, t, text, uncond, cfg_scale, win.stage, win.depth, cond)
            x = x + ((l_next - l) * win.unit) * v.to(x.dtype)
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


class ScaleShiftBridge(nn.Module):
    """BridgeFlow as the released NAMI-2B ships it (bridge_flow.bin): per jump k-1 -> k,

        start_k = scale_k Up(e) + shift_k,    scale_k a scalar, shift_k (1, C, R_k, R_k),

    with no fresh noise. Its training is not released; `fit` solves the same least-squares
    objective as BridgeFlow's restricted to this form (per position: shift = E[T] - scale E[Up e]).
    Decision: at another resolution than the one it was fitted at, shift_k is resized
    bilinearly. Initialised to renoise's mean (scale 1/(2-a), shift 0)."""

    def __init__(self, channels, bounds, sizes):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([1.0 / (1 + bounds[j][1]) for j in range(len(bounds) - 1)]))
        self.shift = nn.ParameterList([nn.Parameter(torch.zeros(1, channels, r, r)) for r in sizes[1:]])

    def forward(self, e, k, xi=None):
        shift = self.shift[k - 2]
        if shift.shape[-1] != 2 * e.shape[-1]:
            shift = F.interpolate(shift, size=(2 * e.shape[-2], 2 * e.shape[-1]), mode="bilinear")
        return self.scale[k - 2] * up(e) + shift.to(e.dtype)

    @torch.no_grad()
    def fit(self, k, pairs):
        """Least squares of T on (Up(e), 1) per position, from streamed (e, xi, T) batches."""
        s = {}
        for e, _, T in pairs:
            U, T = up(e).double(), T.double()
            for name, v in (("n", torch.ones_like(U)), ("u", U), ("t", T), ("uu", U * U), ("ut", U * T), ("tt", T * T)):
                s[name] = s.get(name, 0) + v.sum(0, keepdim=True)
        n, mu, mt = s["n"], s["u"] / s["n"], s["t"] / s["n"]
        cuu, cut, ctt = s["uu"] - n * mu * mu, s["ut"] - n * mu * mt, s["tt"] - n * mt * mt
        scale = cut.sum() / cuu.sum()
        self.scale[k - 2] = scale
        self.shift[k - 2].copy_(mt - scale * mu)
        return float((ctt - 2 * scale * cut + scale ** 2 * cuu).sum() / n.sum())   # fitted MSE per element


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


def timestep_embedding(t, dim=256):
    """Sinusoidal embedding of the model time t * 1000 (FLUX/DiT convention). (B,) -> (B, dim)"""
    return sinusoidal(1000.0 * t, dim)


def rope_angles(cfg, stage, h, w, text_len):
    """Rotary angles for [text; h x w image grid] (FLUX's RoPE): (text_len + h*w, Dh/2), float64.
    Each token has position ids (index, row, col); axis a with d_a rotary dims turns its
    pairs j = 0 .. d_a/2 - 1 by id * theta^(-2j/d_a). Text tokens have ids 0 (no rotation)
    and the index id is always 0 here (FLUX uses it for extra images).

    Decision (Config.rope_grid): "final" measures image positions on the final (stage-K)
    token grid: a stage-k token covers stride = 2^(K-k) final tokens and sits at their
    centre, i*stride + (stride-1)/2, so a location has the same phase at every stage and what
    the shared blocks learn about "where" carries across resolutions. "stage" gives each
    stage the integer ids 0..h-1 of its own grid, as the released NAMI-2B (and FLUX) do.
    PPFlow's merged patches follow the same rule on the base patch grid (patch_factors)."""
    fh, fw = cfg.patch_factors(stage) if cfg.pp_levels else (2 ** (cfg.K - stage),) * 2
    sh, sw = (fh, fw) if cfg.rope_grid == "final" else (1, 1)
    rows = torch.arange(h, dtype=torch.float64) * sh + (sh - 1) / 2
    cols = torch.arange(w, dtype=torch.float64) * sw + (sw - 1) / 2
    ids = torch.stack([torch.zeros(h, w, dtype=torch.float64), rows[:, None].expand(h, w),
                       cols[None, :].expand(h, w)], -1).reshape(h * w, 3)
    ids = F.pad(ids, (0, 0, text_len, 0))                                  # text: ids 0
    per_axis = [ids[:, a, None] * cfg.rope_theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
                for a, d in enumerate(cfg.head_axes())]
    return torch.cat(per_axis, -1)


def apply_rope(x, cos, sin):
    """Rotate consecutive pairs (x_2j, x_2j+1) of x (..., N, Dh) by the angles behind
    cos, sin (N, Dh/2): real arithmetic, so torch.compile generates it like any other op."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2).type_as(x)


def attention(q, k, v, rope, mask):
    """Joint attention over [text; image] tokens. q,k,v: (B,H,N,Dh); rope: the (cos, sin)
    tables for all N tokens; mask: (B,N) bool or None (fixed-length text needs none)."""
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        # bf16 training on CPU: its matrix products run 2x fp32's, but the CPU flash kernel's bf16
        # backward runs ~3x slower than its fp32 one (tiny, EXPERIMENTS 10), so attention stays fp32
        with torch.autocast("cpu", enabled=False):
            return attention(q.float(), k.float(), v.float(), rope, mask)
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    if q.device.type == "cpu" and mask is None and q.shape[2] <= 128 and torch.is_grad_enabled():
        # training on CPU: the flash kernel's backward is built for long sequences; at tiny's
        # 18-78 tokens the plain product makes the whole step x1.11 (EXPERIMENTS 10). Sampling
        # keeps the kernel, faster at its small batches. Written out, not as softmax(), so
        # inductor does not pattern-match it back into the flash kernel
        s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5                 # (B, H, N, N)
        e = (s - s.amax(-1, keepdim=True).detach()).exp()   # the shift cancels: no gradient
        out = (e / e.sum(-1, keepdim=True)) @ v
    else:
        m = None if mask is None else mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    return out.transpose(1, 2).flatten(2)                  # (B, N, H*Dh)


def patchify(x, p, fh=1, fw=1):
    """(B,C,H,W) -> tokens (B, N, C fh fw p p): PPFlow's lossless space-to-depth of fh x fw
    pixels into channels, then p x p patches of that (fh = fw = 1: plain patches, FLUX's
    packing). Row y = (a p + u) fh + i of the image lands in token row a, value (i, u)."""
    B, C, H, W = x.shape
    h, w = H // (p * fh), W // (p * fw)
    return x.reshape(B, C, h, p, fh, w, p, fw).permute(0, 2, 5, 1, 4, 7, 3, 6).reshape(B, h * w, C * fh * fw * p * p)


def unpatchify(t, C, h, w, p, fh=1, fw=1):
    """Inverse of patchify: (B, h*w, C fh fw p p) -> (B, C, h p fh, w p fw)."""
    B = t.shape[0]
    return t.reshape(B, h, w, C, fh, fw, p, p).permute(0, 3, 1, 6, 4, 2, 7, 5).reshape(B, C, h * p * fh, w * p * fw)


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class Linear(nn.Linear):
    """nn.Linear with a faster product for sampling on CPU: in fp32, without autograd or autocast,
    it multiplies by a copy of its weight reordered once for oneDNN (inductor does this for bf16
    only), 1.1-1.6x F.linear's rate at sampling's 32-544 rows here, most at the small stages' few
    rows (EXPERIMENTS 10); torch.compile reaches it through the op nami::packed_linear. The copy
    costs the weight's memory again, so only weights of at most `packing_max` entries get one (all
    of tiny's and cifar's, only a few small layers of 0.6b and 2b). It is remade when the weight
    changes: an in-place write moves the version counter its source shares; a .data or .to() swap
    changes the address (the source keeps the old storage alive, so it cannot be reused).
    `Linear.packing = False` turns it off."""
    packing, packing_max = torch.backends.mkldnn.is_available(), 1 << 21

    def forward(self, x, cols=None):
        """cols (a, b): multiply by weight[:, a:b] alone (with the bias only if a == 0)."""
        w, b = self.weight, self.bias
        a, z = cols or (0, None)
        if not (self.packing and x.device.type == "cpu" and x.dtype == w.dtype == torch.float32
                and w.numel() <= self.packing_max and not torch.is_grad_enabled()
                and not torch.is_autocast_enabled("cpu")):
            return F.linear(x, w[:, a:z] if cols else w, b if a == 0 else None)
        z = w.shape[1] if z is None else z
        op = torch.ops.nami.packed_linear if torch.compiler.is_compiling() else packed_linear
        return op(x, w, b if a == 0 else None, a, z)


def packed_linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], a: int, z: int) -> torch.Tensor:
    """x @ w[:, a:z]^T + b through w's oneDNN copy, made on first use (Linear)."""
    cache = PACKED.setdefault(w, {})
    src, version, packed = cache.get((a, z), (None, None, None))
    if src is None or src.data_ptr() != w.data_ptr() or src._version != version:
        src, version = w.detach(), w._version
        packed = torch.ops.mkldnn._reorder_linear_weight(src[:, a:z].contiguous(), None)
        cache[(a, z)] = (src, version, packed)
    return torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")


PACKED = WeakIdKeyDictionary()      # weight -> {(a, z): (weight seen, its version, oneDNN copy)}
if not hasattr(torch.ops.nami, "packed_linear"):   # an opaque call to inductor, which cannot trace oneDNN's copy
    torch.library.custom_op("nami::packed_linear", packed_linear, mutates_args=()).register_fake(
        lambda x, w, b, a, z: x.new_empty((*x.shape[:-1], w.shape[0])))


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
    """Linear, activation, linear: GELU(tanh) in the blocks, SiLU in the conditioning (FLUX)."""

    def __init__(self, d_in, d_hidden, d_out, act=None):
        super().__init__(Linear(d_in, d_hidden), act or nn.GELU(approximate="tanh"), Linear(d_hidden, d_out))


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
            setattr(self, f"{s}_mod", Linear(d, (6 if full else 2) * d))
            setattr(self, f"{s}_qkv", Linear(d, 3 * d))
            setattr(self, f"{s}_norm", QKNorm(d // heads))
            if full:
                setattr(self, f"{s}_proj", Linear(d, d))
                setattr(self, f"{s}_mlp", MLP(d, hidden, d))

    def modulation(self, vec):
        """adaLN parameters (img (B, 6d), txt (B, 6d or 2d)) from the conditioning vector (B, d)."""
        # silu once per projection, not shared: sharing it sums the two gradients before silu's
        # backward, which changes the trained weights' bits (the README's runs are these)
        return self.img_mod(F.silu(vec)), self.txt_mod(F.silu(vec))

    def forward(self, img, txt, vec, mod, rope, mask):
        """mod: modulation(vec) if computed ahead (the sampler's; vec is then None), else None."""
        im, tm = self.modulation(vec) if mod is None else mod
        im, tm = im.chunk(6, -1), tm.chunk(6 if self.text_out else 2, -1)
        qkv = []
        for s, x, m in (("txt", txt, tm), ("img", img, im)):
            h = modulate(F.layer_norm(x, x.shape[-1:], eps=1e-6), m[0], m[1])
            q, k, v = getattr(self, f"{s}_qkv")(h).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
            qkv.append((*getattr(self, f"{s}_norm")(q, k), v))
        q, k, v = (torch.cat(t, 2) for t in zip(*qkv))    # each (B, H, T + N, Dh): text first, then image
        a = attention(q, k, v, rope, mask)
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
        self.mod = Linear(d, 3 * d)
        self.linear1 = Linear(d, 3 * d + self.hidden)
        self.linear2 = Linear(d + self.hidden, d)
        self.norm = QKNorm(d // heads)

    def modulation(self, vec):
        return self.mod(F.silu(vec))                        # (B, 3d): shift, scale, gate

    def forward(self, x, vec, mod, rope, mask):
        shift, scale, gate = (self.modulation(vec) if mod is None else mod).chunk(3, -1)
        h = modulate(F.layer_norm(x, x.shape[-1:], eps=1e-6), shift, scale)
        qkv, mlp = self.linear1(h).split([3 * x.shape[-1], self.hidden], -1)
        q, k, v = qkv.unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        q, k = self.norm(q, k)
        a = attention(q, k, v, rope, mask)
        # linear2 over [attention, mlp] without materialising the (B, N, 5d) concatenation
        d = x.shape[-1]
        out = self.linear2(a, (0, d)) + self.linear2(F.gelu(mlp, approximate="tanh"), (d, None))
        return x + gate[:, None] * out


class Head(nn.Module):
    """Exit: adaLN (shift, scale) then a linear map to patch values."""

    def __init__(self, d, out):
        super().__init__()
        self.mod = Linear(d, 2 * d)
        self.linear = Linear(d, out)

    def modulation(self, vec):
        return self.mod(F.silu(vec))                        # (B, 2d): shift, scale

    def forward(self, x, vec, mod):
        shift, scale = (self.modulation(vec) if mod is None else mod).chunk(2, -1)
        return self.linear(modulate(F.layer_norm(x, x.shape[-1:], eps=1e-6), shift, scale))


class NAMI(nn.Module):
    """The nested stage model: one stack of blocks; stage k runs the prefix
    m_1 (+) ... (+) m_k at its resolution and exits through its head.

    Decision (Config.stage_heads): one exit head per stage (adaLN + linear, 2 d^2 parameters
    each, 1% of 2B): block L_k's output must both be read out as stage k's velocity and feed
    block L_k + 1 at later stages; separate heads keep those two jobs apart. The release
    shares one. Patch embedding and the conditioning MLPs are always shared. With K = 1 this
    is the uniform FLUX-style baseline.

    Decision (Config.text_positions): text tokens get a sinusoidal position added after
    their projection. Their rotary angle is 0 (as in FLUX), so without it joint attention
    sees the caption as a set of tokens and word order survives only inside the encoder's
    states; T5 keeps it well, a sentence encoder like MiniLM barely ("red" as subject vs
    object: cosine 0.94).
    """

    def __init__(self, cfg: Config):
        super().__init__()
        cfg.check()
        self.cfg, d, p = cfg, cfg.width, cfg.patch
        self.img_in = Linear(cfg.channels * p * p, d)
        tokens_in = lambda k: cfg.channels * p * p * math.prod(cfg.patch_factors(k))     # values per token
        if cfg.pp_levels:                                 # PPFlow: a patch embedding per coarser level, and
            self.level_in = nn.ModuleList([Linear(tokens_in(k), d) for k in range(1, cfg.K)])
            self.level_emb = nn.Embedding(cfg.K, d)       # a level embedding added to the conditioning
        self.txt_in = Linear(cfg.text_dim, d)
        self.time_in = MLP(256, d, d, nn.SiLU())
        self.vector_in = MLP(cfg.pooled_dim, d, d, nn.SiLU())
        self.blocks = nn.ModuleList(
            [DoubleBlock(d, cfg.heads, cfg.mlp_ratio, text_out=i + 1 < cfg.depth) for i in range(cfg.double)]
            + [SingleBlock(d, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth - cfg.double)])
        self.heads = nn.ModuleList([Head(d, tokens_in(k)) for k in range(1, cfg.K + 1 if cfg.stage_heads or cfg.pp_levels else 2)])
        sizes = [cfg.stage_resolution(k) for k in range(1, cfg.K + 1)]
        jumps = cfg.bounds()[:1] if cfg.pp_levels else cfg.bounds()      # PPFlow has no jumps
        self.bridge = (BridgeFlow(cfg.channels, jumps) if cfg.bridge == "linear"
                       else ScaleShiftBridge(cfg.channels, jumps, sizes))
        self.grad_checkpointing = False
        self.tables = {}                                  # (stage, h, w, T, device) -> rotary tables, text positions
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
        if self.cfg.pp_levels:
            # PPFlow: a coarser level's embedding starts as the base one repeated over the merged
            # sub-patches and divided by their count (its train.py, --initialize-from), so a
            # block-constant image gives the tokens the base embedding gives its blocks
            nn.init.normal_(self.level_emb.weight, std=0.02)
            with torch.no_grad():
                for k, lin in enumerate(self.level_in, 1):
                    fh, fw = self.cfg.patch_factors(k)
                    p, C = self.cfg.patch, self.cfg.channels
                    base = self.img_in.weight.view(-1, C, 1, 1, p, p)
                    lin.weight.copy_(base.expand(-1, C, fh, fw, p, p).reshape(lin.weight.shape) / (fh * fw))
                    lin.bias.copy_(self.img_in.bias)

    def forward(self, x, t, text: Text, stage=None, depth=None, cond=None):
        """x: (B,C,H,W) noisy input at stage `stage`'s resolution; t: (B,) model time (the
        noise level sigma, or Pyramid Flow's timestep / 1000: see Window); text: Text.
        depth overrides the stage's number of blocks (bench variants). cond: the stage's
        `conditioning` of (t, text.pooled) if computed ahead (then t is not read). Returns
        the velocity in the config's convention (dx/dsigma, or the window's start - end), (B,C,H,W)."""
        cfg = self.cfg
        stage = cfg.K if stage is None else stage
        depth = cfg.stage_depth(stage) if depth is None else depth
        H, W = x.shape[-2:]
        fh, fw = cfg.patch_factors(stage)
        if H % (cfg.patch * fh) or W % (cfg.patch * fw):
            raise ValueError(f"input {H}x{W} is not divisible into patches of {cfg.patch * fh}x{cfg.patch * fw}")
        key = (stage, H // (cfg.patch * fh), W // (cfg.patch * fw), text.tokens.shape[1], x.device)
        if key not in self.tables:                        # built once per (stage, grid, text length)
            ang = rope_angles(cfg, stage, *key[1:4])
            order = sinusoidal(torch.arange(key[3]), cfg.width).to(x.device) if cfg.text_positions else None
            self.tables[key] = (ang.cos().float().to(x.device), ang.sin().float().to(x.device), order)
        vec = None if cond is not None else self.vector(t, text.pooled, stage)
        return self.stage_forward(x, vec, cond, text.tokens, text.mask, self.tables[key], stage, depth)

    def vector(self, t, pooled, stage):
        """The conditioning vector vec = time embedding + pooled text (+ PPFlow's level),
        (B, d): every block computes its adaLN modulation from it."""
        dtype = self.time_in[0].weight.dtype
        vec = self.time_in(timestep_embedding(t).to(dtype)) + self.vector_in(pooled.to(dtype))
        return vec + self.level_emb.weight[stage - 1].to(dtype) if self.cfg.pp_levels else vec

    def conditioning(self, t, pooled, stage, depth):
        """What the image never changes: the adaLN modulation of the stage's first `depth`
        blocks and of its exit, from the model time t (B,) and the pooled text (B, pooled_dim).
        A list of (B, n d) tensors, one per block (a pair for a double block), then the exit's.
        The sampler knows a window's times in advance and computes all its steps' conditioning
        in one batched call: at batch 1 a step is bound by reading weights, and a double
        block's modulation is 12 d^2 of its 36 d^2 (cifar, stage 1: 30% of the step's bytes).
        Training lets each block compute its own inside its forward (one graph per compiled
        block, and FSDP gathers a block's weights once)."""
        vec = self.vector(t, pooled, stage)
        return [blk.modulation(vec) for blk in self.blocks[:depth]] + [self.exit(stage).modulation(vec)]

    def exit(self, stage):
        return self.heads[stage - 1 if self.cfg.stage_heads or self.cfg.pp_levels else 0]

    def stage_forward(self, x, vec, cond, tokens, mask, tables, stage, depth):
        """The stage's network, a pure tensor function with static stage and depth: what
        torch.compile compiles (compile_stages), one graph per stage and input shape. vec: the
        conditioning vector (B, d), or None with `cond` (the blocks' and exit's modulations)."""
        cfg, p = self.cfg, self.cfg.patch
        (fh, fw), (B, C, H, W) = cfg.patch_factors(stage), x.shape
        h, w = H // (p * fh), W // (p * fw)
        cos, sin, order = tables
        embed = self.img_in if stage == cfg.K or not cfg.pp_levels else self.level_in[stage - 1]
        img = embed(patchify(x, p, fh, fw))                                                  # (B, N, d)
        txt = self.txt_in(tokens.to(img.dtype))                                              # (B, T, d)
        if order is not None:
            txt = txt + order.to(img.dtype)
        mask = None if mask is None else F.pad(mask, (0, h * w), value=True)
        run = lambda blk, *a: checkpoint(blk, *a, use_reentrant=False) if self.grad_checkpointing and self.training else blk(*a)
        cond = cond or [None] * (depth + 1)
        for blk, mod in zip(self.blocks[: min(depth, cfg.double)], cond):
            img, txt = run(blk, img, txt, vec, mod, (cos, sin), mask)
        if depth > cfg.double:
            seq = torch.cat([txt, img], 1)                                    # (B, T + N, d)
            for blk, mod in zip(self.blocks[cfg.double: depth], cond[cfg.double:]):
                seq = run(blk, seq, vec, mod, (cos, sin), mask)
            img = seq[:, txt.shape[1]:]
        out = self.exit(stage)(img, vec, cond[-1])                            # (B, N, C fh fw p p)
        return unpatchify(out, C, h, w, p, fh, fw)


def compile_stages(model, per_block=False, **kw):
    """torch.compile the model's stage network (fullgraph: no graph breaks). The rotary
    tables stay outside, cached per grid, so each stage compiles once per input shape.
    per_block: compile each block instead (regional compilation): the blocks of a stack
    share their compiled code, so a 22-block model compiles in the time of two blocks.
    Each (stage, depth, input shape) is a graph of its own by design, and all models share
    one code object's cache (bench.py's cifar lineup needs 10 graphs), so the recompile limit
    is raised from torch's 8 instead of letting fullgraph fail on the ninth."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    if per_block:
        for blk in model.blocks:
            blk.forward = torch.compile(blk.forward, fullgraph=True, dynamic=False, **kw)
    else:
        model.stage_forward = torch.compile(model.stage_forward, fullgraph=True, dynamic=False, **kw)
    return model


# -----------------------------------------------------------------------------
# Built-in checks: parameter counts and FLOPs (analytic, validated against torch's counter).


def count_params(cfg):
    """Parameters of the model (BridgeFlow included), built on the meta device: no memory."""
    with torch.device("meta"):
        return sum(p.numel() for p in NAMI(cfg).parameters())


def memory_estimate(cfg, micro_batch, ranks, checkpointing, fsdp):
    """Bytes per GPU, estimated for bf16 mixed precision with AdamW, worst case (all samples
    at the highest-resolution stage). States: fp32 weights + grads + Adam (2) + EMA = 20 B per
    parameter, divided by the ranks under FSDP. Activations (bf16, flash attention): about
    34 * N * d bytes per layer per sample (Korthikanti et al., 2022) or, with activation
    checkpointing, 2 * N * d per layer (its input) plus one layer's worth in recompute."""
    P = count_params(cfg)
    N = (cfg.resolution // cfg.patch) ** 2 + cfg.text_len
    states = 20 * P / (ranks if fsdp else 1)
    per_layer = 34 * N * cfg.width
    acts = micro_batch * (cfg.depth * 2 * N * cfg.width + per_layer if checkpointing else cfg.depth * per_layer)
    return states, acts


def forward_flops(cfg, tokens, depth, text_len=None, merged=1):
    """FLOPs (2 per multiply-add) of one forward pass for one image with `tokens` image
    tokens and `depth` blocks: every linear layer plus attention (QK^T and AV, 4 N^2 d).
    merged: base patches per token (PPFlow's coarser levels)."""
    d, T = cfg.width, cfg.text_len if text_len is None else text_len
    hid, N, pc = int(d * cfg.mlp_ratio), tokens + T, cfg.channels * cfg.patch ** 2 * merged
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
    for win, n in zip(plan(cfg, variant), steps):
        merged = math.prod(cfg.patch_factors(win.stage))
        tokens = (cfg.stage_resolution(win.stage, R) // cfg.patch) ** 2 // merged
        total += n * forward_flops(cfg, tokens, win.depth, text_len, merged) * (1 if cfg_scale == 1.0 else 2)
    return total


if __name__ == "__main__":
    # The README's preset table. px: pixels (the latent presets' cells x 8, the FLUX VAE's factor).
    print(f"{'preset':<7}{'params':>9}  {'image (px)':<17}{'stages (px)':<18}{'layers':<14}{'double+single':<15}"
          f"{'NAMI/uniform FLOPs':>18}")
    for name in PRESETS:
        cfg, f = preset(name), 8 if PRESETS[name].get("vae") else 1
        stages = " / ".join(str(cfg.stage_resolution(k) * f) for k in range(1, cfg.K + 1))
        ratio = sampling_flops(cfg, (10,) * cfg.K, cfg_scale=3.0) / sampling_flops(cfg, 30, "baseline", cfg_scale=3.0)
        print(f"{name:<7}{count_params(cfg) / 1e6:>8.1f}M  {f'{cfg.resolution * f}, patch {cfg.patch * f}':<17}{stages:<18}"
              f"{f'{cfg.depth} ({cfg.stage_layers[0]}:{cfg.stage_layers[1]}:{cfg.stage_layers[2]})':<14}"
              f"{f'{cfg.double} + {cfg.depth - cfg.double}':<15}{ratio:>18.2f}")
