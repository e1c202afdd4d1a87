"""
Benchmarks: does NAMI deliver its FLOP savings, and how fast is this code against its peer?

Sampling speed (the paper's Figure 2): one model with random weights sampled three ways with
the SAME weights (batch 1, classifier-free guidance as in deployment, text encoder and VAE
excluded as in the paper), variants timed alternately, median and spread of repeats, FLOPs
counted by torch's FLOP counter on the meta device for the very same sampler call:
  baseline   one window, full depth, full resolution for every step ("FLUX-base")
  piecewise  K windows at increasing resolution, full depth at every stage
  nami       K windows with the nested layer split (the full method)
  ppflow2/3  PPFlow: full resolution, 2 or 3 patch levels over the flow (its own model of the
             same blocks; sigma-convention presets only), the same 30 steps in total

  python bench.py --preset cifar                          # 2 CPU cores, a few minutes
  python bench.py --preset cifar --compile                # torch.compile (compile time reported apart)
  python bench.py --preset 2b --res 32 64 128 256 --flops-only   # FLOPs anywhere (res in latent cells)
  python bench.py --preset 2b --res 128 256 --device cuda --dtype bf16 --compile

Training speed and the peer:
  python bench.py --train                                  # the default tiny training step, eager and compiled
  python bench.py --train --against ../old-checkout        # ... alternately against another checkout (eager, compiled)
  python bench.py --vs-diffusers --preset cifar            # our MM-DiT forward vs diffusers' FluxTransformer2DModel

GPU (one H100/H200, <= 8 minutes, random weights, stand-in encoders): python bench.py --gpu-check

Quality at toy scale (the paper's Figures 7-9, and PPFlow against NAMI): train tiny variants
for equal wall-clock budgets, several seeds, and score each with sample.py --eval (ABLATIONS):
  python bench.py --study                       # 6 variants x 3 seeds, 10 min each: ~2.5 h on 2 cores
  python bench.py --study --minutes 3 --seeds 2 # the short version, ~50 min

Flags mean the same as in train.py / sample.py: --sample-steps is Euler steps per window
(the baseline takes their sum), --res is the final size in model cells (pixels for pixel
presets, VAE latent cells = pixels / 8 for the latent ones).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import data
import nami
import runs
import shapes

VARIANTS = ("baseline", "piecewise", "nami")
PPFLOW = (2, 3)       # PPFlow's levels: a model of their own (per-level embeddings and exits)


def random_text(cfg, batch, device, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return nami.Text(torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g).to(device, dtype), None,
                     torch.randn(batch, cfg.pooled_dim, generator=g).to(device, dtype))


def lineup(cfg, steps, preset=None):
    """{variant: (config, sampler variant, steps per window)}. The three of VARIANTS share one
    model (the baseline's one window takes the steps' sum). With a `preset` name, PPFlow's
    levels too: the same blocks, but a model of its own (per-level embeddings and exits),
    the same total steps split over its levels by their share of the flow (default_steps)."""
    out = {"baseline": (cfg, "baseline", (sum(steps),)), "piecewise": (cfg, "piecewise", steps),
           "nami": (cfg, "nami", steps)}
    if preset and cfg.timesteps == "sigma":             # PPFlow is written in the sigma convention
        for L in PPFLOW:
            pp = nami.preset(preset, pp_levels=L)
            out[f"ppflow{L}"] = (pp, "nami", nami.default_steps(pp, sum(steps)))
    return out


def build_models(lineup_, device, dtype):
    """One random model per distinct config of a lineup, exits drawn non-zero (zero-init exits
    would make every image 0)."""
    models = {}
    for cfg, _, _ in lineup_.values():
        if id(cfg) not in models:
            torch.manual_seed(0)
            m = nami.NAMI(cfg)
            with torch.no_grad():
                for h in m.heads:
                    h.linear.weight.normal_(std=0.02)
            models[id(cfg)] = m.to(device, dtype).eval()
    return models


def counted_flops(cfg, variant, res, steps, cfg_scale):
    """FLOPs of one sampler call, counted by torch on the meta device (no memory, no time)."""
    with torch.device("meta"):
        model = nami.NAMI(cfg)
    text, unc = random_text(cfg, 1, "meta", torch.float32, 0), random_text(cfg, 1, "meta", torch.float32, 1)
    with FlopCounterMode(display=False) as counter:
        nami.sample(model, text, unc, steps, cfg_scale, variant=variant, resolution=res)
    return counter.get_total_flops()


def timer(device):
    """A wall-clock reading that waits for queued GPU work first."""
    def now():
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()
    return now


def sampling_latency(models, lineup_, res, cfg_scale, repeats, device, dtype):
    """{variant: [seconds per image]}: one warm-up call each (compiles, if compiled; timed
    apart), then `repeats` rounds that time every variant once, alternately, in reverse order
    every other round, so drift in the machine's speed hits all variants alike."""
    cfg = next(iter(lineup_.values()))[0]
    text, unc = random_text(cfg, 1, device, dtype, 0), random_text(cfg, 1, device, dtype, 1)
    now = timer(device)

    def once(v):
        vcfg, variant, steps = lineup_[v]
        t0 = now()
        nami.sample(models[id(vcfg)], text, unc, steps, cfg_scale, variant=variant, resolution=res,
                    generator=torch.Generator(device).manual_seed(0))
        return now() - t0

    warm = {v: once(v) for v in lineup_}
    times = {v: [] for v in lineup_}
    for r in range(repeats):
        for v in list(lineup_)[:: -1 if r % 2 else 1]:
            times[v].append(once(v))
        print(f"  res {res}: round {r + 1}/{repeats} " + " ".join(f"{v} {times[v][-1]:.3f}s" for v in lineup_), flush=True)
    return times, warm


def speed(a):
    cfg = nami.preset(a.preset)
    cfg_scale = a.cfg if a.cfg is not None else nami.TRAIN[a.preset]["cfg"]
    steps = nami.parse_steps(a.sample_steps, cfg.K)
    device, dtype = torch.device(a.device), torch.bfloat16 if a.dtype == "bf16" else torch.float32
    factor = 8 if cfg.vae else 1
    todo = lineup(cfg, steps, a.preset)
    models = None
    if not a.flops_only:
        models = build_models(todo, device, dtype)
        if a.compile:
            for m in models.values():
                nami.compile_stages(m)
    print(f"{a.preset}: {nami.count_params(cfg) / 1e6:.1f}M params, layers {cfg.stage_layers}, {a.device}, {a.dtype}"
          f"{', compiled' if a.compile else ''}, cfg {cfg_scale}, batch 1; steps per window: "
          + ", ".join(f"{v} {'/'.join(map(str, st))}" for v, (_, _, st) in todo.items()))
    rows = []
    for res in a.res or [cfg.resolution]:
        cfg.check(res)
        flops = {v: counted_flops(c, var, res, st, cfg_scale) for v, (c, var, st) in todo.items()}
        times, warm = sampling_latency(models, todo, res, cfg_scale, a.repeats, device, dtype) if models else ({}, {})
        lat = {v: statistics.median(t) for v, t in times.items()}
        row = {"preset": a.preset, "res": res, "px": res * factor, "device": a.device, "dtype": a.dtype,
               "compiled": a.compile, "steps": {v: list(st) for v, (_, _, st) in todo.items()}, "cfg": cfg_scale,
               "flops": flops, "latency_s": lat or None,
               "latency_range_s": {v: [min(t), max(t)] for v, t in times.items()} or None, "first_call_s": warm or None}
        for v in list(todo)[1:]:
            row[f"{v}_flop_reduction"] = round(1 - flops[v] / flops["baseline"], 4)
            row[f"{v}_latency_reduction"] = round(1 - lat[v] / lat["baseline"], 4) if lat else None
            per_round = [1 - a / b for a, b in zip(times.get(v, []), times.get("baseline", []))]
            row[f"{v}_latency_reduction_rounds"] = [round(min(per_round), 4), round(max(per_round), 4)] if lat else None
        rows.append(row)
    print(f"\n{'px':>5} {'variant':>10} {'TFLOP':>9} {'latency s (min-max)':>22} {'FLOP red.':>10} {'latency red. (per round)':>28}")
    for row in rows:
        for v in todo:
            lat = "-" if not row["latency_s"] else \
                f"{row['latency_s'][v]:.3f} ({row['latency_range_s'][v][0]:.3f}-{row['latency_range_s'][v][1]:.3f})"
            red = "" if v == "baseline" else f"{row[f'{v}_flop_reduction']:10.1%}"
            lred = "" if v == "baseline" or not row["latency_s"] else \
                f"{row[f'{v}_latency_reduction']:.1%} ({row[f'{v}_latency_reduction_rounds'][0]:.1%} to {row[f'{v}_latency_reduction_rounds'][1]:.1%})"
            print(f"{row['px']:>5} {v:>10} {row['flops'][v] / 1e12:9.3f} {lat:>22} {red:>10} {lred:>28}")
    for row in rows:
        print(json.dumps(row))
    if a.plot and len(rows) > 1:
        plot_speed(rows, a.plot)
    return rows


def plot_speed(rows, path):
    """TFLOP (and latency, if measured) per image against resolution, one line per variant."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("flops", "TFLOP per image", 1e12)] + ([("latency_s", "seconds per image", 1)] if rows[0]["latency_s"] else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    px, r0 = [r["px"] for r in rows], rows[0]
    for ax, (key, label, unit) in zip(axes[0], panels):
        for v in r0["flops"]:
            ax.plot(px, [r[key][v] / unit for r in rows], marker="o", label=v)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(px, [str(p) for p in px])
        ax.set_xlabel("image side (px)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.suptitle(f"{r0['preset']}, 30 steps, cfg {r0['cfg']}, {r0['device']} {r0['dtype']}"
                 f"{', compiled' if r0['compiled'] else ''}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


# -----------------------------------------------------------------------------
# Training step: images/s and achieved GFLOP/s of the default step, for this checkout and
# (optionally) another one, each in its own worker process, timed in alternating rounds.


def train_worker(src, preset, compiled):
    """Runs in a subprocess: imports the checkout at `src`, builds the preset's model,
    optimizer, EMA and shapes-world data as train.py does, then answers each line N on stdin
    with the times of N more steps. Written against the API both checkouts share."""
    sys.path.insert(0, os.path.abspath(src))
    for m in ("nami", "data", "shapes", "train", "runs"):
        sys.modules.pop(m, None)
    import importlib
    N, D, S = (importlib.import_module(m) for m in ("nami", "data", "shapes"))
    R = importlib.import_module("runs") if os.path.exists(os.path.join(src, "runs.py")) else None
    bf16 = getattr(R, "train_dtype", lambda d: "fp32")("cpu") == "bf16"   # train.py's default precision
    recipe = getattr(N, "TRAIN", None) or importlib.import_module("train").TRAIN
    phases = getattr(N, "PHASES", None) or importlib.import_module("train").PHASES
    r = recipe[preset]
    ratios = phases[r.get("phases", "paper")][0][1]
    cfg = N.preset(preset)
    torch.manual_seed(0)
    model = N.NAMI(cfg)
    model.bridge.requires_grad_(False)
    if compiled:                                          # as train.py compiles it
        N.compile_stages(model, per_block=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=r["lr"],
                            betas=(0.9, r.get("beta2", 0.99)), weight_decay=0.0, fused=True)
    ema = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
    enc = (D.load_encoders(cfg, "cpu", 100_000)[0] if hasattr(D, "load_encoders")
           else D.TextEncoder(cfg.text_encoder, cache_size=100_000))
    enc.warm([""] + S.all_captions())
    encode = D.encode_text if hasattr(D, "encode_text") else lambda e, c, d: N.Text(*e.encode(c))
    B = r["batch_size"]

    def step(i):
        images, captions = S.make_batch(B, 0, i)
        captions = ["" if j % 10 == 0 else c for j, c in enumerate(captions)]    # caption drop, 10%
        x, text = D.to_tensor(images), encode(enc, captions, "cpu")
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss, _, _ = N.nami_loss(model, x, text, ratios, None, None, torch.Generator().manual_seed(i))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for k, v in model.state_dict().items():
                ema[k].lerp_(v.float(), 0.005) if v.dtype.is_floating_point else ema[k].copy_(v)

    t0 = time.perf_counter()
    for i in range(3):                                    # warm-up, and compilation of every stage
        step(i)
    print(json.dumps({"ready": True, "warmup_s": time.perf_counter() - t0, "batch": B, "ratios": list(ratios),
                      "dtype": "bf16" if bf16 else "fp32"}), flush=True)
    i = 3
    for line in sys.stdin:
        times = []
        for _ in range(int(line)):
            t0 = time.perf_counter()
            step(i)
            times.append(time.perf_counter() - t0)
            i += 1
        print(json.dumps({"times": times}), flush=True)


def train_flops(cfg, batch, ratios):
    """Analytic FLOPs of one training step: 3x the forward (backward is twice the forward) of
    every sample at its stage, with the exact per-stage counts of nami_loss."""
    counts = nami.stage_counts(batch, ratios)
    return sum(3 * n * nami.forward_flops(cfg, (cfg.stage_resolution(k) // cfg.patch) ** 2, cfg.stage_depth(k))
               for k, n in zip(range(1, cfg.K + 1), counts))


def train_bench(a):
    here = os.path.dirname(os.path.abspath(__file__))
    kinds = [("this checkout, eager", here, False), ("this checkout, compiled", here, True)]
    if a.against:                                         # and compiled, where that checkout can compile
        kinds.append((f"{a.against}, eager", a.against, False))
        if "def compile_stages(" in open(os.path.join(a.against, "nami.py")).read():
            kinds.append((f"{a.against}, compiled", a.against, True))
    workers = []
    for name, src, compiled in kinds:
        cmd = [sys.executable, os.path.join(here, "bench.py"), "--train-worker", src, "--preset", a.preset]
        proc = subprocess.Popen(cmd + (["--compile"] if compiled else []), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        workers.append((name, proc))
    ready = {}
    for name, proc in workers:                            # built one after another: starting is not timed
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the training worker for {name} failed to start")
        ready[name] = json.loads(line)
        print(f"{name} ({ready[name]['dtype']}): ready, first 3 steps (warm-up"
              f"{', compile' if 'compiled' in name else ''}) {ready[name]['warmup_s']:.1f} s", flush=True)
    times = {name: [] for name, _ in workers}
    for r in range(a.repeats):
        for name, proc in workers:                        # alternate: machine drift hits all alike
            proc.stdin.write(f"{a.train_steps}\n")
            proc.stdin.flush()
            times[name] += json.loads(proc.stdout.readline())["times"]
        print(f"round {r + 1}/{a.repeats}: " + ", ".join(f"{n} {statistics.median(t[-a.train_steps:]) * 1e3:.0f} ms"
                                                        for n, t in times.items()), flush=True)
    for _, proc in workers:
        proc.stdin.close()
        proc.wait()
    cfg = nami.preset(a.preset)
    batch, ratios = ready[workers[0][0]]["batch"], ready[workers[0][0]]["ratios"]
    flops = train_flops(cfg, batch, ratios)
    rows = []
    for name, t in times.items():
        med = statistics.median(t)
        rows.append({"kind": name, "dtype": ready[name]["dtype"], "ms_per_step": round(med * 1e3, 1),
                     "min_ms": round(min(t) * 1e3, 1), "max_ms": round(max(t) * 1e3, 1), "img_per_s": round(batch / med, 1),
                     "gflop_per_s": round(flops / med / 1e9, 1), "warmup_s": round(ready[name]["warmup_s"], 1),
                     "steps_timed": len(t)})
    base = rows[2]["img_per_s"] if a.against else rows[0]["img_per_s"]     # x: against the other's eager step
    print(f"\n{a.preset}: batch {batch}, ratios {ratios}, {flops / 1e9:.1f} GFLOP per step (analytic)")
    for row in rows:
        print(f"{row['kind']:>40}: {row['ms_per_step']:7.1f} ms ({row['min_ms']:.0f}-{row['max_ms']:.0f}), "
              f"{row['img_per_s']:7.1f} img/s, {row['gflop_per_s']:6.1f} GFLOP/s, x{row['img_per_s'] / base:.2f}")
    for row in rows:
        print(json.dumps(row))
    return rows


# -----------------------------------------------------------------------------
# Against the peer: the same network in diffusers' FluxTransformer2DModel.


def flux_peer(cfg, blocks=None):
    """(diffusers FluxTransformer2DModel, our model holding the same weights) for the K = 1
    baseline of `cfg` in FLUX's conventions (integer RoPE ids, one exit, no text positions,
    time = sigma), with every weight random and non-zero. blocks: keep only the first N."""
    from diffusers import FluxTransformer2DModel
    from diffusers.models.attention import FeedForward
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock
    depth = blocks or cfg.depth
    double = min(cfg.double, depth)
    ours_cfg = nami.Config(**{**cfg.__dict__, "stage_layers": (depth,), "windows": (1,), "double": double,
                              "rope_grid": "stage", "stage_heads": False, "text_positions": False,
                              "timesteps": "sigma", "bridge": "linear"}).check()
    Dh = cfg.width // cfg.heads
    torch.manual_seed(0)
    flux = FluxTransformer2DModel(patch_size=1, in_channels=cfg.channels * cfg.patch ** 2, num_layers=double,
                                  num_single_layers=depth - double, attention_head_dim=Dh, num_attention_heads=cfg.heads,
                                  joint_attention_dim=cfg.text_dim, pooled_projection_dim=cfg.pooled_dim,
                                  axes_dims_rope=ours_cfg.head_axes())
    if cfg.mlp_ratio != 4.0:                              # FLUX fixes 4; give its blocks the preset's ratio
        for b in flux.transformer_blocks:
            b.ff = FeedForward(cfg.width, cfg.width, mult=cfg.mlp_ratio, activation_fn="gelu-approximate")
            b.ff_context = FeedForward(cfg.width, cfg.width, mult=cfg.mlp_ratio, activation_fn="gelu-approximate")
        flux.single_transformer_blocks = torch.nn.ModuleList(
            [FluxSingleTransformerBlock(cfg.width, cfg.heads, Dh, cfg.mlp_ratio) for _ in range(depth - double)])
    with torch.no_grad():
        for p in flux.parameters():
            p.copy_(0.05 * torch.randn_like(p))
    ours = nami.NAMI(ours_cfg)
    ours.load_state_dict(runs.flux_to_nami(flux.state_dict(), ours_cfg), strict=False)   # K = 1: no bridge
    return flux.eval(), ours.eval()


def vs_diffusers(a):
    cfg = nami.preset(a.preset)
    nami.Linear.packing = False     # like for like: both models on F.linear (ours samples on oneDNN's)
    flux, ours = flux_peer(cfg, a.blocks)
    res, B, dev = (a.res or [cfg.resolution])[0], 2, torch.device(a.device)
    flux, ours = flux.to(dev), ours.to(dev)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, cfg.channels, res, res, generator=g).to(dev)
    t, text = torch.rand(B, generator=g).to(dev), random_text(cfg, B, dev, torch.float32, 2)
    p, h = cfg.patch, res // cfg.patch
    packed = x.view(B, cfg.channels, h, p, h, p).permute(0, 2, 4, 1, 3, 5).reshape(B, h * h, -1)
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(h.__float__()), torch.arange(h.__float__()),
                                     indexing="ij"), -1).reshape(-1, 3).to(dev)
    txt_ids = torch.zeros(cfg.text_len, 3, device=dev)
    run_flux = lambda: flux(hidden_states=packed, encoder_hidden_states=text.tokens, pooled_projections=text.pooled,
                            timestep=t, img_ids=ids, txt_ids=txt_ids, return_dict=False)[0]
    run_ours = lambda: ours(x, t, text)
    with torch.no_grad():
        ref = run_flux().view(B, h, h, cfg.channels, p, p).permute(0, 3, 1, 4, 2, 5).reshape(x.shape)
        err = (run_ours() - ref).abs().max().item()
        print(f"{a.preset} ({ours.cfg.depth} blocks, {h * h} image + {cfg.text_len} text tokens, batch {B}): "
              f"max |ours - diffusers| = {err:.2e}", flush=True)
        if err > 1e-4 * max(1.0, ref.abs().max().item()):
            raise RuntimeError("the two models disagree: the comparison would not be like for like")
        now = timer(dev)
        times = {"ours": [], "diffusers": []}
        for fn in (run_ours, run_flux):                   # warm-up
            fn()
        for r in range(a.repeats):
            for name, fn in (("ours", run_ours), ("diffusers", run_flux)):
                t0 = now()
                fn()
                times[name].append(now() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    row = {"preset": a.preset, "blocks": ours.cfg.depth, "tokens": h * h + cfg.text_len, "batch": B,
           "ours_s": round(med["ours"], 5), "diffusers_s": round(med["diffusers"], 5),
           "ratio": round(med["ours"] / med["diffusers"], 3),
           "ratio_range": [round(min(o / d for o, d in zip(times["ours"], times["diffusers"])), 3),
                           round(max(o / d for o, d in zip(times["ours"], times["diffusers"])), 3)],
           "max_abs_diff": err, "device": a.device}
    print(f"forward: ours {med['ours'] * 1e3:.1f} ms, diffusers {med['diffusers'] * 1e3:.1f} ms, "
          f"ratio {row['ratio']} (per-round range {row['ratio_range'][0]}-{row['ratio_range'][1]}, {a.repeats} rounds)")
    print(json.dumps(row))
    return row


# -----------------------------------------------------------------------------
# The GPU check: what only a GPU can show, in one command of <= 8 minutes on one H100/H200.

PEAK_BF16 = {"H200": 790e12, "H100": 790e12, "A100": 312e12}   # dense bf16 matmul rate (H200: measured)


def gpu_check(a):
    """Random weights, random stand-in text inputs (the encoders and VAE are excluded from
    every timing, as in the paper). Measures (1) 2b sampling latency at 1024 and 2048 px,
    bf16, compiled per block, batch 1, 10/10/10 steps with CFG 3: NAMI, piecewise, baseline;
    (2) one FSDP2 training step of 2b at 1024 (batch 1, all at stage 3, activation
    checkpointing): seconds and peak memory against the dry run's estimate; (3) 0.6b training
    images/s at 256 px (its multi-resolution mix, bf16) with MFU. Writes one JSON file.
    --gpu-check-smoke runs the same code on a tiny model on the CPU (what the tests run)."""
    import torch.distributed as dist
    smoke = a.gpu_check_smoke
    dev = torch.device("cpu" if smoke else "cuda")
    name = "cpu (smoke)" if smoke else torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    dtype = torch.float32 if smoke else torch.bfloat16
    report = {"device": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "smoke": smoke}
    now = timer(dev)
    t_all = time.perf_counter()

    def big(preset, **kw):                                # the preset, or a miniature for the smoke run
        return nami.preset(preset, **({"width": 64, "heads": 2, "text_dim": 32, "pooled_dim": 16, "text_len": 8,
                                       "rope_axes": (), **kw} if smoke else kw))

    # (1) sampling latency
    cfg = big("2b", **({"resolution": 16} if smoke else {}))
    steps = (10, 10, 10) if not smoke else (1, 1, 1)
    todo = lineup(cfg, steps)
    models = build_models(todo, dev, dtype)
    model = models[id(cfg)]
    if not smoke:
        nami.compile_stages(model, per_block=True)
    report["sampling"] = []
    for res in ((8, 16) if smoke else (128, 256)):
        times, warm = sampling_latency(models, todo, res, 3.0, 1 if smoke else 3, dev, dtype)
        flops = {v: counted_flops(c, var, res, st, 3.0) for v, (c, var, st) in todo.items()}
        lat = {v: statistics.median(t) for v, t in times.items()}
        row = {"px": res * 8, "steps": list(steps), "cfg": 3.0, "latency_s": lat, "first_call_s": warm,
               "tflop": {v: f / 1e12 for v, f in flops.items()},
               "flop_reduction": 1 - flops["nami"] / flops["baseline"], "latency_reduction": 1 - lat["nami"] / lat["baseline"],
               "mfu": {v: flops[v] / lat[v] / peak for v in VARIANTS} if peak else None}
        report["sampling"].append(row)
        print(json.dumps(row), flush=True)
    del model, models
    # (2) one FSDP2 training step of 2b at 1024, activation checkpointing
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        dist.init_process_group("gloo" if smoke else "nccl", rank=0, world_size=1)
    torch.manual_seed(0)
    model = nami.NAMI(cfg).to(dev)
    model.bridge.requires_grad_(False)
    model.grad_checkpointing = True
    step_fn = runs.wrap(model, fsdp=not smoke, distributed=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    R = cfg.resolution
    x = torch.randn(1, cfg.channels, R, R, device=dev)
    text = random_text(cfg, 1, dev, torch.float32, 3)
    if not smoke:
        torch.cuda.reset_peak_memory_stats()
    step_times = []
    for i in range(2 if smoke else 4):                    # the first includes warm-up
        t0 = now()
        with torch.autocast(dev.type, torch.bfloat16, enabled=not smoke):
            loss, _, _ = step_fn(x, text, (0, 0, 1), None, None, torch.Generator(dev).manual_seed(i))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step_times.append(now() - t0)
    states, acts = nami.memory_estimate(cfg, 1, 1, True, not smoke)
    report["fsdp_step"] = {"px": R * 8, "batch": 1, "checkpointing": True, "seconds": statistics.median(step_times[1:]),
                           "first_step_s": step_times[0],
                           "peak_memory_gib": None if smoke else torch.cuda.max_memory_allocated() / 2 ** 30,
                           "estimate_gib": (states + acts) / 2 ** 30}
    print(json.dumps(report["fsdp_step"]), flush=True)
    del model, step_fn, opt
    # (3) 0.6b training images/s at 256 px, its multi-resolution mix
    cfg = big("0.6b", resolution=32 if not smoke else 16)
    torch.manual_seed(0)
    model = nami.NAMI(cfg).to(dev)
    model.bridge.requires_grad_(False)
    if not smoke:
        nami.compile_stages(model, per_block=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=not smoke)
    B, ratios = (64, (4, 2, 1)) if not smoke else (6, (4, 2, 1))
    x = torch.randn(B, cfg.channels, cfg.resolution, cfg.resolution, device=dev)
    text = random_text(cfg, B, dev, torch.float32, 4)
    step_times = []
    for i in range(6 if not smoke else 2):
        t0 = now()
        with torch.autocast(dev.type, torch.bfloat16, enabled=not smoke):
            loss, _, _ = nami.nami_loss(model, x, text, ratios, generator=torch.Generator(dev).manual_seed(i))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step_times.append(now() - t0)
    sec = statistics.median(step_times[1:])
    flops = train_flops(cfg, B, ratios)
    report["train_0.6b"] = {"px": cfg.resolution * 8, "batch": B, "ratios": list(ratios), "seconds_per_step": sec,
                            "img_per_s": B / sec, "tflop_per_s": flops / sec / 1e12,
                            "mfu": flops / sec / peak if peak else None, "first_steps_s": step_times[0]}
    print(json.dumps(report["train_0.6b"]), flush=True)
    report["total_s"] = time.perf_counter() - t_all
    if dist.is_initialized():
        dist.destroy_process_group()
    with open(a.gpu_check_out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {a.gpu_check_out} ({report['total_s']:.0f} s)")
    return report


# -----------------------------------------------------------------------------
# Quality at equal budget on the shapes world. Each entry: (name, train.py flags, sample.py
# flags); a name with train flags None is scored on the previous run's weights (nami+bridge:
# the NAMI run, whose BridgeFlow train.py --transition bridge fits after its budget).
# Every run samples 30 Euler steps: 10/10/10 for NAMI, 30 for the baseline, PPFlow's levels
# in proportion to their share of the flow (15/15, 15/8/7).
ABLATIONS = {
    # the seeds' comparison (issue: NAMI vs Pyramid Flow vs PPFlow vs the uniform baseline)
    "study": [("baseline", ["--variant", "baseline"], []),
              ("piecewise", ["--variant", "piecewise"], []),
              ("nami", ["--transition", "bridge"], ["--transition", "renoise"]),
              ("nami+bridge", None, ["--transition", "bridge"]),
              ("ppflow2", ["--variant", "ppflow2"], []),
              ("ppflow3", ["--variant", "ppflow3"], [])],
    # tiny's own split 2:2:2 and windows 2:1:1 are the "nami" row of the study
    "layers": [(f"layers {s}", ["--set", f"stage_layers={s}"], []) for s in ("1:1:4", "4:1:1")],
    "windows": [(f"windows {w}", ["--set", f"windows={w}"], []) for w in ("1:1:1", "1:1:2")],
}


def ablate(kinds, minutes, out, seeds, eval_seeds, jobs, n_eval, plot=None):
    """Train every variant of `kinds` at every training seed for `minutes` of wall clock,
    `jobs` at a time with the CPU cores split evenly between them, so that every run gets
    the same compute; score each with `sample.py --eval` (`n_eval` images per prompt) at every
    eval seed, also `jobs` at a time; print per variant the mean and min-max over all (training
    seed, eval seed) pairs, training and sampling images/s and sampling FLOPs per image; JSON
    lines; a plot.
    Runs train eager: at one thread each, compiling takes ~5 minutes, most of a short budget.
    They train without tiny's head start, start share and caption mix (on the uniform one the
    study was measured with): the study compares the papers' methods, and on the K = 1
    baseline a stage-1 head start would mean full-resolution steps at pure noise."""
    cores = os.cpu_count() or 1
    if not 1 <= jobs <= cores:
        raise ValueError(f"--jobs {jobs}: give each variant at least one of the {cores} cores")
    env = {**os.environ, "OMP_NUM_THREADS": str(cores // jobs), "TQDM_DISABLE": "1"}
    here, queue, evals = os.path.dirname(os.path.abspath(__file__)), [], []
    os.makedirs(out, exist_ok=True)
    for kind in kinds:
        for seed in seeds:
            for name, train_flags, eval_flags in ABLATIONS[kind]:
                if train_flags is not None:
                    run = os.path.join(out, f"{kind}-{name.replace(' ', '_')}-s{seed}")
                    if not os.path.isfile(os.path.join(run, "config.json")):    # a rerun picks up finished runs
                        queue.append((run, [sys.executable, os.path.join(here, "train.py"), "--minutes", str(minutes),
                                            "--out", out, "--name", os.path.basename(run), "--seed", str(seed),
                                            "--no-compile", "--head-start", "0", "--start-share", "0", "--data", "shapes",
                                            *train_flags]))
                evals.append((kind, name, seed, run, eval_flags))
    for i in range(0, len(queue), jobs):
        procs = [(run, subprocess.Popen(cmd, env=env, stdout=open(run + ".log", "w"), stderr=subprocess.STDOUT))
                 for run, cmd in queue[i: i + jobs]]
        print(f"[{time.strftime('%H:%M')}] training {', '.join(os.path.basename(r) for r, _ in procs)} "
              f"({minutes} min, {env['OMP_NUM_THREADS']} thread(s) each; batch {i // jobs + 1} of "
              f"{-(-len(queue) // jobs)})", flush=True)
        for run, proc in procs:
            if proc.wait():
                raise RuntimeError(f"training {run} failed: see {run}.log")
    scored, jobs_ = [], []
    for kind, name, seed, run, eval_flags in evals:
        for es in eval_seeds:
            jobs_.append((kind, name, seed, run, es, [sys.executable, os.path.join(here, "sample.py"), "--ckpt", run,
                                                      "--eval", "--n", str(n_eval), "--seed", str(es), *eval_flags]))
    for i in range(0, len(jobs_), jobs):                  # scored `jobs` at a time, cores split as in training
        batch = jobs_[i: i + jobs]
        print(f"[{time.strftime('%H:%M')}] scoring " + ", ".join(f"{n} s{s} eval {es}" for _, n, s, _, es, _ in batch)
              + f" ({i + len(batch)}/{len(jobs_)})", flush=True)
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for *_, cmd in batch]
        for (kind, name, seed, run, es, _), proc in zip(batch, procs):
            stdout, stderr = proc.communicate()
            if proc.returncode:
                raise RuntimeError(f"scoring {run} failed:\n{stderr[-2000:]}")
            result = json.loads(stdout.strip().splitlines()[-1])
            meta = json.load(open(os.path.join(run, "config.json")))
            log = [json.loads(line) for line in open(os.path.join(run, "log.jsonl"))] or [{}]
            cfg = runs.config_from_json(meta["model"])
            steps = nami.parse_steps(meta["sample"]["steps"], cfg.K)
            scored.append({"ablation": kind, "variant": name, "seed": seed, "eval_seed": es, "minutes": minutes,
                           "steps": meta["step"], "train_img_per_s": log[-1].get("img_per_s"),
                           "sample_img_per_s": result["images_per_s"],
                           "sample_gflop": round(nami.sampling_flops(cfg, steps, cfg_scale=result["cfg"]) / 1e9, 3),
                           **{c: result[c] for c in (*shapes.CATEGORIES, "overall")}})
    cats = (*shapes.CATEGORIES, "overall")
    rows = []
    for kind, name in dict.fromkeys((r["ablation"], r["variant"]) for r in scored):
        rs = [r for r in scored if (r["ablation"], r["variant"]) == (kind, name)]
        mean = lambda key: round(statistics.mean(r[key] for r in rs), 4)
        rows.append({"ablation": kind, "variant": name, "runs": len({r["seed"] for r in rs}), "evals": len(rs),
                     "minutes": minutes, "steps": mean("steps"), "train_img_per_s": mean("train_img_per_s"),
                     "sample_img_per_s": mean("sample_img_per_s"), "sample_gflop": rs[0]["sample_gflop"],
                     **{c: mean(c) for c in cats}, **{f"{c}_range": [min(r[c] for r in rs), max(r[c] for r in rs)]
                                                       for c in cats}})
    print(f"\n{'variant':>14} {'steps':>6} {'train img/s':>11} {'sample img/s':>12} {'GFLOP':>7} "
          + " ".join(f"{c[:8]:>8}" for c in cats) + "  overall min-max")
    for r in rows:
        print(f"{r['variant']:>14} {r['steps']:>6.0f} {r['train_img_per_s']:>11.0f} {r['sample_img_per_s']:>12.1f} "
              f"{r['sample_gflop']:>7.2f} " + " ".join(f"{r[c]:8.3f}" for c in cats)
              + f"  {r['overall_range'][0]:.3f}-{r['overall_range'][1]:.3f}")
    with open(os.path.join(out, "results.jsonl"), "w") as f:
        for r in scored + rows:
            f.write(json.dumps(r) + "\n")
    for r in rows:
        print(json.dumps(r))
    if plot:
        plot_quality(rows, plot)
    return rows


def plot_quality(rows, path):
    """Overall accuracy against sampling FLOPs per image, one point per variant, bars min-max."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for r in rows:
        lo, hi = r["overall_range"]
        ax.errorbar(r["sample_gflop"], r["overall"], yerr=[[r["overall"] - lo], [hi - r["overall"]]],
                    fmt="o", capsize=3, label=r["variant"])
        ax.annotate(r["variant"], (r["sample_gflop"], r["overall"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("sampling GFLOP per image (30 steps, CFG)")
    ax.set_ylabel("shapes-world overall accuracy")
    ax.set_title(f"equal training budget: {rows[0]['minutes']} min, {rows[0]['runs']} seeds x "
                 f"{rows[0]['evals'] // rows[0]['runs']} eval seeds", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=list(nami.PRESETS))
    p.add_argument("--res", type=int, nargs="+", help="final sizes in model cells (default: the preset's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile every stage (compile time reported apart)")
    p.add_argument("--sample-steps", default="10", help="Euler steps per window (the baseline: their sum)")
    p.add_argument("--cfg", type=float, help="guidance scale (default: the preset's; 1 = no CFG)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (each times every variant once)")
    p.add_argument("--flops-only", action="store_true", help="count FLOPs on the meta device, skip timing")
    p.add_argument("--plot", default="speed.png", help="with several --res: where to write the plot")
    p.add_argument("--train", action="store_true", help="time the preset's training step, eager and compiled")
    p.add_argument("--against", metavar="DIR", help="with --train: also time the checkout in DIR, alternately")
    p.add_argument("--train-steps", type=int, default=5, help="with --train: steps per round and kind")
    p.add_argument("--train-worker", metavar="SRC", help=argparse.SUPPRESS)
    p.add_argument("--vs-diffusers", action="store_true", help="time our forward against diffusers' FLUX")
    p.add_argument("--blocks", type=int, help="with --vs-diffusers: keep the first N blocks (a slice)")
    p.add_argument("--gpu-check", action="store_true", help="the prepared GPU measurement (see gpu_check)")
    p.add_argument("--gpu-check-smoke", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--gpu-check-out", default="gpu_check.json")
    p.add_argument("--study", action="store_true", help="train and score the study's variants (= --ablate study)")
    p.add_argument("--ablate", nargs="+", choices=list(ABLATIONS), help="train and score tiny variants (see ABLATIONS)")
    p.add_argument("--minutes", type=float, default=10, help="with --study/--ablate: wall-clock budget per run")
    p.add_argument("--seeds", type=int, default=3, help="with --study/--ablate: training seeds 0..N-1 per variant")
    p.add_argument("--eval-seeds", type=int, default=2, help="with --study/--ablate: eval seeds 0..N-1 per run")
    p.add_argument("--jobs", type=int, default=2, help="with --study/--ablate: runs trained at once, cores split evenly")
    p.add_argument("--n-eval", type=int, default=4, help="with --study/--ablate: evaluation images per prompt")
    p.add_argument("--out", default="out/study", help="with --study/--ablate: where runs and results.jsonl go")
    a = p.parse_args(argv)
    if a.gpu_check or a.gpu_check_smoke:
        return gpu_check(a)
    if a.train_worker:
        return train_worker(a.train_worker, a.preset, a.compile)
    if a.train:
        return train_bench(a)
    if a.vs_diffusers:
        return vs_diffusers(a)
    if a.study or a.ablate:
        return ablate(["study"] if a.study else a.ablate, a.minutes, a.out, list(range(a.seeds)),
                      list(range(a.eval_seeds)), a.jobs, a.n_eval, os.path.join(a.out, "quality.png"))
    return speed(a)


if __name__ == "__main__":
    main()
