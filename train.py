"""
Train NAMI (progressive rectified flow transformers) with the paper's multi-resolution joint
training: every step trains all stages on one batch that mixes resolutions.

  python train.py                                  # tiny preset, built-in shapes world, 2 CPU cores
  python train.py --preset cifar --data cifar:/data/cifar-10-batches-py
  python train.py --data /data/my_images           # imagefolder: metadata.jsonl with file_name, text
  python train.py --preset 2b --dry-run            # parameters, FLOPs per stage, memory per GPU
  torchrun --nproc_per_node=8 train.py --preset 2b --data '/data/laion/{00000..09999}.tar' --fsdp
  python train.py --resume out/tiny                # continue a stopped run exactly where it stopped

Output (out/<run>/, see runs.py): config.json, step_N/ with model.safetensors (EMA weights,
what sample.py loads) and state.pt (raw weights + optimizer + step, for --resume; tensors only,
loaded weights_only), log.jsonl (per-stage losses), samples.png + stages.png (+ .txt with their
prompts). A run folder is made once: a second run into it needs --resume or --overwrite, and
one train.py at a time holds it. Ctrl-C or SIGTERM (schedulers, docker stop) finishes the step,
saves and prints how to resume; a non-finite loss or gradient stops the run before it touches
the weights, keeping the last checkpoint.
"""
import os

# Before torch loads libgomp, which reads it once. By default a thread that waits at the end of
# a parallel region sleeps after ~3 ms of spinning; on a shared machine another process then
# takes its core, and each of the step's thousands of short regions waits for it to come back.
# Spinning up to ~0.4 s keeps the core through a step's gaps and still gives it up while
# inductor compiles (spinning without end, OMP_WAIT_POLICY=ACTIVE, slowed that by ~20 s). Beside
# a CPU hog the compiled step ran x0.85, quiet the same, the same bits (EXPERIMENTS 10). Not under
# torchrun, whose ranks share the cores, nor over the user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT.
if not {"LOCAL_RANK", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(os.environ):
    os.environ["GOMP_SPINCOUNT"] = "30000000"

import argparse
import contextlib
import dataclasses
import glob
import json
import math
import re
import signal
import time
from dataclasses import asdict, fields, replace

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import nami
import runs
import shapes

VARIANTS = {"nami": {}, "piecewise": {"nested": False}, "baseline": {"baseline": True},     # the same blocks,
            "ppflow2": {"pp_levels": 2}, "ppflow3": {"pp_levels": 3}}                        # another flow
CAPTION_DROP = 0.1        # captions replaced by "" so one model also gives v(x | no text), for CFG
LOSS_EMA = 0.99           # smoothing of the per-stage losses behind the dynamic weights


def phase(progress, K=3, phases="paper"):
    """(stage ratios, lr multiplier) at a point of the run (0..1) of the named PHASES, which
    are written for K = 3 stages; a K = 1 baseline trains every sample at its one stage.
    A multiplier (a, b) goes linearly from a to b over its phase."""
    start = 0.0
    for end, ratios, lr_mult in nami.PHASES[phases]:
        if progress < end:
            break
        start = end
    if isinstance(lr_mult, tuple):
        t = (progress - start) / (end - start) if progress < end else 1.0
        lr_mult = lr_mult[0] + (lr_mult[1] - lr_mult[0]) * t
    if K == 1:
        return (1,), lr_mult
    if len(ratios) != K:
        raise ValueError(f"nami.PHASES[{phases!r}] gives resolution ratios for {len(ratios)} stages but the model has "
                         f"K = {K}: write ratios for {K} stages there")
    return ratios, lr_mult


def stage_ratios(cfg, progress, phases):
    """The resolution mix at this point of the run. PPFlow's levels take samples in proportion
    to their share of the flow (its train.py: uniform time overall) at every point."""
    return tuple(cfg.windows) if cfg.pp_levels else phase(progress, cfg.K, phases)[0]


def learning_rate(base, step, progress, warmup, phases="paper"):
    """Linear warmup over `warmup` steps (0: none), then the current phase's multiplier."""
    return base * phase(progress, 3, phases)[1] * (min(1.0, (step + 1) / warmup) if warmup else 1.0)


def schedule(a, cfg, step, total, progress, joined):
    """(in the head start?, stage ratios, lr) at `step` of a `total`-step run (None: a time
    budget), `progress` (0..1) through it, the phases begun at step `joined` (None: not yet
    known, under a time budget). The head start, the run's first a.head_start, trains stage 1
    alone at pure noise, where the layout is chosen (EXPERIMENTS.md 7(f)-(g)); the phases then
    run over the rest, their warmup started again for the stages that join there."""
    head = step < joined if joined is not None else progress < a.head_start
    if head:
        return True, (1,) + (0,) * (cfg.K - 1), learning_rate(a.lr, step, 0.0, a.warmup, a.phases)
    joined = step if joined is None else joined
    p = (step - joined) / (total - joined) if total else (progress - a.head_start) / (1 - a.head_start)
    return False, stage_ratios(cfg, p, a.phases), learning_rate(a.lr, step - joined, p, a.warmup, a.phases)


def dynamic_weights(stage_loss_ema):
    """Per-stage loss weights w_k = mean_j(L_j) / L_k from smoothed stage losses L_k: every
    stage is weighted by the inverse of its own loss scale, so the noisiest window (largest
    irreducible loss) cannot drown the others and all stages progress at comparable relative
    rates; the mean weight stays ~1. The paper only says the weights are "dynamically
    adjusted according to the training process"; this is our rule."""
    L = torch.tensor(stage_loss_ema, dtype=torch.float64)
    return (L.mean() / L).tolist()


# -----------------------------------------------------------------------------
# Data: every source is a function step -> (x, captions, native stages) for this rank's share
# of the global batch, a pure function of (seed, step) where the source allows it.


def open_data(spec, cfg, batch, seed, rank, world, workers, vae=None, device="cpu"):
    """spec: 'shapes' | 'cifar:PATH' | imagefolder PATH | latent folder PATH | '*.tar' shards.
    Returns get(step) -> (x in model space on `device`, captions, native stage or None)."""
    factor = vae.factor if vae else 1
    res = [cfg.stage_resolution(k) * factor for k in range(1, cfg.K + 1)]   # pixels per stage
    stage_of = lambda native: torch.tensor([sum(r <= n for r in res) for n in native])

    def model_space(x, captions, native_px):
        x = x.to(device)
        if vae is not None and x.shape[1] == 3:             # pixels -> latents (pre-encoded data skips this)
            x = data.encode_latents(vae, x, native_px)
        return x, captions, None if native_px is None else stage_of(native_px)

    if is_shapes(spec):
        if (cfg.channels, cfg.resolution) != (3, 32):
            raise ValueError("the shapes world is 32x32 RGB: use a pixel-space preset (tiny, cifar)")
        opts = shapes.options(spec)

        def get(step):
            images, captions = shapes.make_batch(batch, seed, step, **opts)
            return model_space(data.to_tensor(images[rank::world]), captions[rank::world], None)
        return get
    if is_shards(spec):                                   # a stream, resumed at its batch (data.WebStream)
        ds = data.WebDataset(spec, res, rank, world, seed)
        workers = min(workers, len(ds.shards) // world)   # a worker without shards would starve
        stream = {"next": None, "it": None}

        def get(step):
            if stream["next"] != step:
                stream["it"] = iter(_loader(data.WebStream(ds, batch // world, step), batch // world, workers))
            stream["next"] = step + 1
            return model_space(*_unpack(next(stream["it"])))
        return get
    if spec.startswith("cifar:"):
        ds = data.Cifar10(spec[len("cifar:"):])
        if res[-1] != 32:
            raise ValueError(f"CIFAR-10 images are 32x32 but the model's final resolution is {res[-1]} px")
    elif os.path.isdir(spec) and any(f.startswith("latents_") for f in os.listdir(spec)):
        ds = data.LatentFolder(spec)
    else:
        ds = data.ImageFolder(spec, res)
        if rank == 0 and (ds.missing or ds.no_caption):
            print(f"{spec}: left out {ds.missing} listed file(s) that do not exist and {ds.no_caption} "
                  f"entr{'y' if ds.no_caption == 1 else 'ies'} with an empty caption; training on {len(ds)}")
    n = len(ds)
    if n < batch:
        raise ValueError(f"{spec} has {n} samples, fewer than one batch of {batch}: lower --batch-size")

    def indices(step):                                    # epoch-wise permutations of the global batch
        per_epoch = n // batch
        perm = np.random.default_rng([seed, step // per_epoch]).permutation(n)
        i = (step % per_epoch) * batch
        return perm[i: i + batch][rank::world].tolist()

    state = {"next": None, "it": None}

    def get(step):
        if state["next"] != step:                         # (re)start the loader at this step
            state["it"] = iter(_loader(ds, None, workers, (indices(s) for s in range(step, 1 << 62))))
        state["next"] = step + 1
        return model_space(*_unpack(next(state["it"])))
    return get


def is_shards(spec):
    return spec.endswith(".tar") or "{" in spec


def _loader(ds, batch, workers, batch_sampler=None):
    kw = dict(num_workers=workers, collate_fn=list, persistent_workers=False)
    if batch_sampler is not None:
        return torch.utils.data.DataLoader(ds, batch_sampler=batch_sampler, **kw)
    return torch.utils.data.DataLoader(ds, batch_size=batch, **kw)


SKIPPED = {"n": 0}                                        # unreadable images, counted here (any worker)


def _unpack(items):
    good = [it for it in items if it is not None]         # corrupt images come back as None: skipped
    SKIPPED["n"] += len(items) - len(good)
    if not good:
        raise ValueError("a whole batch was unreadable: check the dataset's images")
    xs, captions, native = zip(*good)
    x = torch.stack(list(xs)) if torch.is_tensor(xs[0]) else data.to_tensor(np.stack(xs))
    return x, list(captions), list(native)


# -----------------------------------------------------------------------------
# Built-in report: parameters, FLOPs per stage, memory per GPU (nami.memory_estimate).


def flops_str(f):
    """A FLOP count in the unit that keeps 1-4 digits before the point."""
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if f >= scale:
            return f"{f / scale:,.1f} {unit}"
    return f"{f:,.0f} FLOP"


# What a training step achieves, for the dry run's time estimates: measured with bench.py
# --train (tiny, compiled, bf16 products, 2 CPU cores, 2026-12-05: 93-104 GFLOP/s), and 40% of
# the bf16 matrix rate of one H100/H200 (790 TFLOP/s measured on an H200) for the latent
# presets: an assumption.
RATES = {"cpu": (95e9, "this project's 2-core CPU, compiled, bf16 (bench.py --train)"),
         "gpu": (0.4 * 790e12, "one H100/H200 at 40% of 790 TFLOP/s bf16 (assumed)")}


def dry_run(cfg, a, ranks):
    P = nami.count_params(cfg)
    factor = 8 if cfg.vae else 1
    print(f"params: {P / 1e9:.2f}B" if P > 1e9 else f"params: {P / 1e6:.2f}M")
    print(f"stages: {cfg.K}, layers {':'.join(map(str, cfg.stage_layers))} of {cfg.depth} "
          f"({cfg.double} double-stream first), windows {[(round(s, 3), round(e, 3)) for s, e in cfg.bounds()]}")
    per_stage = []
    for k in range(1, cfg.K + 1):
        r, merged = cfg.stage_resolution(k), math.prod(cfg.patch_factors(k))
        tokens = (r // cfg.patch) ** 2 // merged
        f = nami.forward_flops(cfg, tokens, cfg.stage_depth(k), merged=merged)
        per_stage.append(3 * f)
        print(f"  stage {k}: {r * factor}x{r * factor} px ({r}x{r} cells), {tokens} image + {cfg.text_len} text tokens, "
              f"{cfg.stage_depth(k)} blocks: {flops_str(f)} forward, {flops_str(3 * f)} per training image")
    steps = nami.parse_steps(a.sample_steps, cfg.K)
    nf = nami.sampling_flops(cfg, steps, cfg_scale=a.cfg)
    bf = nami.sampling_flops(cfg, sum(steps), "baseline", cfg_scale=a.cfg)
    print(f"sampling {sum(steps)} steps (cfg {a.cfg}): NAMI {flops_str(nf)} vs uniform baseline "
          f"{flops_str(bf)} per image (-{100 * (1 - nf / bf):.1f}%)")
    if a.steps:                                           # the whole schedule: phases at their stage mix
        grid = [(i + 0.5) / 100 for i in range(100)]
        mix = [stage_ratios(cfg, p, a.phases) for p in grid]
        per_image = sum(sum(r * f for r, f in zip(ratios, per_stage)) / sum(ratios) for ratios in mix) / len(grid)
        total = a.steps * a.batch_size * per_image
        rate, where = RATES["gpu" if cfg.vae else "cpu"]
        hours = total / rate / 3600
        print(f"training {a.steps:,} steps of batch {a.batch_size}: {flops_str(total)}, about "
              f"{hours:,.1f} {'GPU-hours' if cfg.vae else 'hours'} on {where}")
    micro = max(1, a.batch_size // (ranks * a.grad_accum))
    states, acts = nami.memory_estimate(cfg, micro, ranks, a.checkpointing, a.fsdp)
    print(f"memory per GPU (estimate, {ranks} rank(s), micro-batch {micro}, "
          f"{'FSDP' if a.fsdp else 'replicated'}, checkpointing {'on' if a.checkpointing else 'off'}): "
          f"{(states + acts) / 2 ** 30:.1f} GiB = {states / 2 ** 30:.1f} states + {acts / 2 ** 30:.1f} activations")
    if states + acts > 70 * 2 ** 30:
        print("  more than an 80 GB GPU holds: shard the states with --fsdp over more --ranks, add "
              "--checkpointing, or raise --grad-accum to shrink the micro-batch")


# -----------------------------------------------------------------------------


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=list(nami.PRESETS))
    p.add_argument("--data", help="shapes[:mirror,forms=a:b:c:d] | cifar:PATH | an imagefolder or latent folder | "
                   "'shards/{0000..0099}.tar' (default: the preset's shapes world)")
    p.add_argument("--steps", type=int)
    p.add_argument("--minutes", type=float, help="train for this wall-clock budget instead of --steps (ablations)")
    p.add_argument("--batch-size", type=int, help="global batch, over all ranks and accumulation")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float)
    p.add_argument("--beta2", type=float, help="AdamW's second-moment decay (beta1 is 0.9)")
    p.add_argument("--warmup", type=int, help="linear learning-rate warmup steps (0: none)")
    p.add_argument("--ema", type=float)
    p.add_argument("--phases", choices=list(nami.PHASES), help="resolution ratios over the run (nami.PHASES; default: the preset's)")
    p.add_argument("--head-start", type=float, metavar="F", help="train stage 1 alone, every sample at pure noise, for "
                   "this fraction of the run before the phases (0: none; default: the preset's; EXPERIMENTS.md 7(f)-(g))")
    p.add_argument("--head-start-data", metavar="SPEC", help="the head start's --data (default: the preset's on the "
                   "shapes world, else --data)")
    p.add_argument("--start-share", type=float, metavar="F", help="after the head start, this fraction of the samples "
                   "trains at its window's start, where the sampler's first step of each window begins (default: "
                   "the preset's; 0: none)")
    p.add_argument("--loss-weights", choices=["dynamic", "uniform"], default="dynamic")
    p.add_argument("--out", default="out", help="parent folder of runs")
    p.add_argument("--name", help="run name (default: the preset); runs go to OUT/NAME")
    p.add_argument("--resume", help="a run folder to continue")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in OUT/NAME (checkpoint and log)")
    p.add_argument("--init-from", metavar="DIR", help="fine-tune: start a new run from these weights (a run folder, "
                   "or the released NAMI-2B's folder); the model config comes from there")
    p.add_argument("--stop-at", type=int, help="stop (and save) at this step, to be resumed later")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="bf16: autocast, fp32 weights (default: bf16 on GPUs and "
                   "on CPUs with bf16 instructions, else fp32)")
    p.add_argument("--dry-run", action="store_true", help="report parameters, FLOPs and memory, then exit")
    p.add_argument("--ranks", type=int, help="with --dry-run: ranks to estimate memory for")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (torchrun), bf16 mixed precision")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile each block (default: the preset's; the first steps then include compiling)")
    p.add_argument("--workers", type=int, default=2, help="data loader processes (folder data)")
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--log-every", type=int, default=10)
    # model variants (ablations): same code, different config
    p.add_argument("--variant", choices=list(VARIANTS), default="nami",
                   help="baseline: uniform FLUX-style (K = 1, full depth); piecewise: flow only, all blocks at every "
                        "stage; ppflow2/3: PPFlow's patch pyramid at full resolution (nested with --set nested=true)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a model Config field, e.g. --set stage_layers=1:1:4 --set windows=2:1:1 --set width=384")
    # what the end-of-run samples use
    p.add_argument("--transition", choices=["renoise", "bridge"], default="renoise",
                   help="bridge: fit BridgeFlow on the model's own stage end points after training")
    p.add_argument("--cfg", type=float)
    p.add_argument("--sample-steps")
    return p


def parse_args(argv=None):
    p = parser()
    a = p.parse_args(argv)
    for action in p._actions:                             # parse again to see which flags were typed
        action.default = argparse.SUPPRESS
    return a, vars(p.parse_args(argv))


# flags that describe one invocation, not the run: never recorded, never carried over by
# --resume (nor is --device, which is the machine's: settle_args drops it)
TRANSIENT = {"stop_at": None, "overwrite": False, "dry_run": False, "resume": None}
ENCODERS = ("text_encoder", "pooled_encoder", "vae")     # Config fields: where frozen models load from


def settle_args(a, given):
    """Fill unset flags: from the run being resumed (its own settings, overridden only by the
    flags typed now), else the preset's defaults. --stop-at never carries over."""
    if a.resume:
        path = os.path.join(a.resume, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--resume {a.resume}: not a train.py run folder (expected config.json "
                                    f"and state.pt; a run saves them every --save-every steps and on Ctrl-C)")
        meta = runs.read_meta(a.resume)
        saved = {k: v for k, v in check_saved_args(meta.get("args", {}), path).items() if k != "device"}
        # a run saved before --phases and --beta2 existed trained with the paper's phases and 0.99
        a = argparse.Namespace(**{**vars(a), "phases": "paper", "beta2": 0.99, **saved, **TRANSIENT, **given})
    else:
        meta = None
        if a.init_from and "preset" not in given:         # fine-tuning: the recipe of the weights' preset
            a.preset = runs.preset_of(a.init_from)
        for k, v in nami.TRAIN[a.preset].items():
            if getattr(a, k) is None:
                setattr(a, k, v)
        if a.variant.startswith("ppflow") and "sample_steps" not in given:   # 30 steps, split PPFlow's way
            a.sample_steps = ",".join(map(str, nami.default_steps(nami.preset(a.preset, **VARIANTS[a.variant]))))
    a.head_start = a.head_start or 0.0
    a.start_share = a.start_share or 0.0                  # (runs saved before the flag existed trained with 0)
    if a.head_start_data and "head_start_data" not in given and is_shapes(a.head_start_data) != is_shapes(a.data):
        a.head_start_data = None                          # the preset's is for the shapes world: use --data
    if a.dtype is None:
        a.dtype = runs.train_dtype(a.device)
    if "steps" in given and "minutes" not in given:       # an explicit step count beats a time budget,
        a.minutes = None                                  # the preset's or a resumed run's used-up one
    return a, meta


def check_saved_args(saved, path):
    """The flags a resumed run saved, type-checked as the command line would have parsed them."""
    for act in parser()._actions:
        v = saved.get(act.dest)
        if v is None or act.dest == "help":
            continue
        kind = {int: int, float: (int, float)}.get(act.type, bool if act.nargs == 0 else list if act.dest == "set" else str)
        ok = isinstance(v, kind) and not (kind is not bool and isinstance(v, bool))
        ok = ok and (not act.choices or v in act.choices) and (kind is not list or all(isinstance(x, str) for x in v))
        if not ok:
            raise ValueError(f"{path}: args.{act.dest} is {v!r}, which {act.option_strings[0]} does not take")
    return saved


def check_args(a, start=0):
    """Refuse bad flag values now, before any model, encoder or data is loaded. `start`: the step
    a resumed run is at."""
    finite = lambda v: v is not None and math.isfinite(v)
    runs.check_device(a.device)
    checks = [
        (a.resume and a.overwrite, "--resume continues a run and --overwrite replaces one: pass only one"),
        (a.steps is not None and a.steps < 1, f"--steps {a.steps}: give a positive number of steps"),
        (a.steps is not None and a.minutes is None and a.steps < start,
         f"--steps {a.steps}: the run is already at step {start}; pass a larger --steps to train on"),
        (a.minutes is not None and not (finite(a.minutes) and a.minutes > 0),
         f"--minutes {a.minutes}: give a positive time budget"),
        (a.steps is None and a.minutes is None, "give --steps or --minutes"),
        (a.batch_size < 1, f"--batch-size {a.batch_size}: give at least 1"),
        (a.grad_accum < 1, f"--grad-accum {a.grad_accum}: give at least 1 (1 = no accumulation)"),
        (not (finite(a.lr) and a.lr > 0), f"--lr {a.lr}: the learning rate must be a positive number"),
        (not (finite(a.beta2) and 0 <= a.beta2 < 1), f"--beta2 {a.beta2}: AdamW's decay lies in [0, 1), e.g. 0.99"),
        (a.warmup < 0, f"--warmup {a.warmup}: give 0 (no warmup) or more steps"),
        (not (finite(a.head_start) and 0 <= a.head_start < 1),
         f"--head-start {a.head_start}: give the fraction of the run in [0, 1), e.g. 0.2 (0: none)"),
        (not (finite(a.start_share) and 0 <= a.start_share <= 1),
         f"--start-share {a.start_share}: give a fraction in [0, 1], e.g. 0.1 (0: none)"),
        (not (finite(a.ema) and 0 <= a.ema < 1), f"--ema {a.ema}: the EMA decay lies in [0, 1), e.g. 0.999"),
        (a.save_every < 1, f"--save-every {a.save_every}: give at least 1 step"),
        (a.log_every < 1, f"--log-every {a.log_every}: give at least 1 step"),
        (a.workers < 0, f"--workers {a.workers}: give 0 (load in this process) or more"),
        (not 0 <= a.seed < 1 << 63, f"--seed {a.seed}: seeds are integers in [0, 2^63)"),
        (a.ranks is not None and a.ranks < 1, f"--ranks {a.ranks}: give at least 1"),
        (a.stop_at is not None and a.stop_at <= start,
         f"--stop-at {a.stop_at}: the run is at step {start}; give a later step"),
        (a.cfg is not None and not (finite(a.cfg) and a.cfg >= 0),
         f"--cfg {a.cfg}: the guidance scale must be a finite number >= 0 (0 = unconditional, 1 = no guidance)"),
        (not re.fullmatch(r"\d+(,\d+)*", str(a.sample_steps)),
         f"--sample-steps {a.sample_steps}: give Euler steps per window, e.g. 10,10,10 (or 10 for each)"),
        (not a.resume and a.name is not None and not a.name.strip(), "--name is empty"),
        (not a.resume and os.path.exists(a.out) and not os.path.isdir(a.out),
         f"--out {a.out} is a file, not a folder for runs: pick another --out"),
        (not data_exists(a.data), f"--data {a.data}: no such folder or shard (shards: a list of .tar paths, a "
                                  f"glob or a brace pattern such as 'data/{{00000..00099}}.tar')"),
        (a.head_start_data is not None and not data_exists(a.head_start_data),
         f"--head-start-data {a.head_start_data}: no such folder or shard"),
    ]
    for bad, message in checks:
        if bad:
            raise ValueError(message)


def data_exists(spec):
    """Cheap existence check of --data: the folder, or at least one shard the pattern names."""
    if is_shards(spec):
        return any(glob.glob(p) for p in data.expand_braces(spec))
    if is_shapes(spec):
        shapes.options(spec)                              # a bad option raises its own message
        return True
    return os.path.exists(spec[len("cifar:"):] if spec.startswith("cifar:") else spec)


def is_shapes(spec):
    return spec.split(":")[0] == "shapes"


def check_memory(cfg, a, world):
    """On a CPU, refuse a model whose training states alone (20 B per parameter: fp32 weights,
    gradients, two Adam moments and the EMA) exceed this machine's memory, before allocating
    any of it: the latent presets are GPU models."""
    if not a.device.startswith("cpu"):
        return
    states = 20 * nami.count_params(cfg) / (world if a.fsdp else 1)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if states > ram:
        raise ValueError(f"--preset {a.preset} needs ~{states / 2 ** 30:.0f} GiB for its training states, and this "
                         f"machine has {ram / 2 ** 30:.0f} GiB: train it on GPUs (--device cuda, --fsdp over more "
                         f"ranks); --dry-run reports what it needs")


def step_seed(*parts):
    """One 62-bit seed per (seed, step, micro-batch, purpose): a resumed run redraws exactly."""
    return int.from_bytes(np.random.SeedSequence(list(parts)).generate_state(2, np.uint32).tobytes(), "little") >> 2


def parse_set(item):
    """--set FIELD=VALUE -> (field, value of the field's type: a:b:c = tuple, true/false = bool)."""
    default = nami.Config()
    key, _, value = item.partition("=")
    if not hasattr(default, key) or key in ("K", "depth"):
        raise ValueError(f"--set {item}: no Config field {key!r}; fields: "
                         f"{', '.join(f.name for f in fields(nami.Config))}")
    kind = type(getattr(default, key))
    try:
        if kind is bool and value.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ValueError
        v = (tuple((float if "." in x else int)(x) for x in value.split(":")) if kind is tuple else
             value.lower() in ("1", "true", "yes") if kind is bool else kind(value))
    except ValueError:
        example = {tuple: "a:b:c", bool: "true or false", float: "a number"}.get(kind, "an int")
        raise ValueError(f"--set {item}: {key} takes {example}") from None
    return key, runs.check_field(key, v, f"--set {item}")


def build_config(a, base=None):
    """The preset (or `base`, the config of --init-from's weights) with the variant and --set overrides."""
    kw = dict(VARIANTS[a.variant]) if base is None else {}
    kw.update(parse_set(item) for item in a.set)
    return dataclasses.replace(base, **kw).check() if base is not None else nami.preset(a.preset, **kw)


def model_config(a, given, meta, init=None):
    """The model Config: a new run's from its flags; a resumed run's from its config.json. Flags
    typed on --resume may not change that model (the weights have its shapes), only where its
    frozen encoders load from."""
    if meta is None:
        return build_config(a, init.cfg if init is not None else None)
    cfg = runs.config_from_json(meta["model"], os.path.join(a.resume, "config.json"))
    refuse = lambda flag, saved: ValueError(
        f"--resume {a.resume}: {flag} cannot change a saved model (config.json has {saved}); drop the flag, "
        f"or start a new run with --name")
    if "preset" in given and given["preset"] != meta.get("preset"):
        raise refuse(f"--preset {given['preset']}", f"preset {meta.get('preset')}")
    if "variant" in given and given["variant"] != meta.get("args", {}).get("variant", "nami"):
        raise refuse(f"--variant {given['variant']}", f"variant {meta.get('args', {}).get('variant', 'nami')}")
    changes = {}
    for item in given.get("set", []):
        key, value = parse_set(item)
        if key in ENCODERS:
            changes[key] = value
        elif value != getattr(cfg, key):
            raise refuse(f"--set {item}", f"{key}={getattr(cfg, key)}")
    return dataclasses.replace(cfg, **changes)


def main(argv=None):
    """The run, step by step: settle and check the flags (nothing loaded yet), take the run
    folder, then train, save, sample (`training`)."""
    a, given = parse_args(argv)
    a, meta = settle_args(a, given)
    check_args(a, meta.get("step", 0) if meta else 0)
    init = runs.load(a.init_from)[0] if a.init_from and not a.resume else None
    cfg = model_config(a, given, meta, init)
    nami.parse_steps(a.sample_steps, cfg.K)               # bad --sample-steps or stage ratios fail
    stage_ratios(cfg, 0.0, a.phases)                      # fails now, not after training
    distributed = "RANK" in os.environ
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if distributed else (0, 1)
    if a.dry_run:
        return dry_run(cfg, a, a.ranks or world)
    if a.batch_size % (world * a.grad_accum):
        raise ValueError(f"--batch-size {a.batch_size} must divide by ranks x --grad-accum = {world * a.grad_accum}")
    check_memory(cfg, a, world)
    if distributed:
        start_distributed(a)
    run = a.resume or os.path.join(a.out, a.name or a.preset)
    if a.resume and not os.path.isfile(os.path.join(runs.checkpoint_dir(run, meta), "state.pt")):
        runs.load_checkpoint(run)                         # raises its "no state.pt" message, before any loading
    lock = runs.claim(run, bool(a.resume), a.overwrite) if rank == 0 else None
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        training(a, given, cfg, meta, run, rank, world, distributed, init)
    finally:
        for s, h in handlers.items():                     # a caller (pytest) gets its Ctrl-C back
            signal.signal(s, h)
        if lock:
            runs.release(lock)
    if distributed:
        dist.destroy_process_group()
    return run


def training(a, given, cfg, meta, run, rank, world, distributed, init=None):
    """Encoders, data, model (restored on --resume, or from --init-from's weights `init`), the
    training loop, the last save, samples."""
    master, dev = rank == 0, torch.device(a.device)
    # a run folder is untrusted input: the encoders its config.json names load only from disk,
    # unless typed now (--set text_encoder=...)
    typed = {parse_set(item)[0] for item in given.get("set", [])}
    local_only = {getattr(cfg, f): f"pass --set {f}={getattr(cfg, f)} to allow fetching it from the hub, or "
                                   f"--set {f}=FOLDER for a local copy"
                  for f in ENCODERS if meta and f not in typed and getattr(cfg, f)}
    # finite caption sets (shapes: ~2k, CIFAR: 10) are worth caching; open-ended ones are not
    enc, vae = data.load_encoders(cfg, a.device, 100_000 if is_shapes(a.data) or a.data.startswith("cifar:") else 0,
                                  local_only)
    if is_shapes(a.data):                                 # its whole grammar, once: ~2 s
        enc.warm([""] + shapes.all_captions())
    get_batch = open_data(a.data, cfg, a.batch_size // a.grad_accum, a.seed, rank, world, a.workers, vae, dev)
    head_batch = (open_data(a.head_start_data, cfg, a.batch_size // a.grad_accum, a.seed, rank, world, a.workers, vae,
                            dev) if a.head_start and a.head_start_data else get_batch)
    st = runs.load_checkpoint(run, cfg.K) if a.resume else None
    model, step_fn, opt, ema, resumed = build(cfg, a, st, distributed, run, init)
    fitted = init is not None and cfg.bridge == "scale-shift"    # the release's bridge comes fitted
    del st, init
    start, elapsed, loss_ema = resumed
    old_steps = (meta or {}).get("args", {}).get("steps") if start else None   # before this run's flags replace them
    # what config.json records: the flags this run trains with, typed now or carried over
    meta = {**(meta or {}), "preset": a.preset, "model": asdict(cfg), "data": a.data, "text_encoder": enc.id,
            "vae": cfg.vae, "args": {k: v for k, v in vars(a).items() if k not in TRANSIENT},
            "sample": {"cfg": a.cfg, "steps": a.sample_steps, "transition": a.transition,
                       "bridge_fitted": (meta or {}).get("sample", {}).get("bridge_fitted", fitted)}}
    logf = runs.open_log(run, start) if master else None
    if master:
        print(f"run {run}: {nami.count_params(cfg) / 1e6:.2f}M parameters, stages "
              f"{[cfg.stage_resolution(k) for k in range(1, cfg.K + 1)]}, layers {cfg.stage_layers}, "
              f"{world} rank(s), batch {a.batch_size}, {a.dtype}{', compiled' if a.compile else ''}"
              + (f", from step {start}" if start else ""))
        print(f"the bar's L1..L{cfg.K}: each stage's smoothed loss (log.jsonl 'stage_loss'; loss.png at the end)"
              + ("; the first joint step includes compiling (~1.5-2.5 min on 2 CPU cores the first time, seconds once cached)"
                 if a.compile else ""))
        if old_steps and a.steps and old_steps != a.steps and not a.minutes:
            lr_at = lambda n: schedule(a, cfg, start, n, start / n, round(a.head_start * n))[2]
            print(f"--steps {a.steps}: the schedule now spans {a.steps} steps, so at step {start} the lr is "
                  f"{lr_at(a.steps):.2e} (it was {lr_at(old_steps):.2e} of the {old_steps}-step schedule)")

    stop = {"signal": None}
    for s in (signal.SIGINT, signal.SIGTERM):             # Ctrl-C, and what schedulers and docker stop
        signal.signal(s, lambda num, _: stop.update(signal=num))   # send: finish the step, save
    budget = 60 * a.minutes if a.minutes else None
    total = a.steps if budget is None else 1 << 62
    t0 = time.time() - elapsed                            # a resumed time budget goes on where it stopped
    t_start, seen, saved = time.time(), 0, start if a.resume else None
    # a time budget's bar counts seconds of it, a step count's steps; disable= only when true,
    # as an explicit False would override TQDM_DISABLE=1 (which keeps background logs small)
    bar = tqdm(total=int(budget) if budget else total, initial=int(elapsed) if budget else start,
               unit="s" if budget else "it", dynamic_ncols=True, **({} if master else {"disable": True}))
    step = start
    # the step the phases begin after the head start; a time budget's is known once reached,
    # and config.json keeps it for --resume
    joined = round(a.head_start * total) if budget is None else meta.get("joined_at")
    while step < total and not stop["signal"] and step != a.stop_at:
        progress = (time.time() - t0) / budget if budget else step / total
        if progress >= 1:
            break
        head, ratios, lr = schedule(a, cfg, step, None if budget else total, progress, joined)
        if not head and joined is None:
            joined = meta["joined_at"] = step
        for group in opt.param_groups:
            group["lr"] = lr
        weights = dynamic_weights(loss_ema) if a.loss_weights == "dynamic" else None
        # the head start runs eager: compiled, its steps would save ~11 s in all on 2 CPU cores but
        # its graphs take ~28 s to build from an empty cache (EXPERIMENTS 10)
        with torch.compiler.set_stance("force_eager") if head else contextlib.nullcontext():
            stage_sum, stage_n = accumulate_gradients(step_fn, head_batch if head else get_batch, enc, a, step,
                                                      ratios, weights, cfg.K, rank, world, distributed,
                                                      1.0 if head else a.start_share)
        grad_norm = clip_gradients(model)
        check_finite(stage_sum, grad_norm, step, a, run, saved)
        optimizer_step(model, opt, ema, a.ema, step)
        update_loss_ema(loss_ema, stage_sum, stage_n, step)
        step += 1
        seen += a.batch_size
        if master:
            ips = seen / (time.time() - t_start)
            bar.update(min(int(time.time() - t0), int(budget)) - bar.n if budget else 1)
            bar.set_postfix({**({"step": step} if budget else {}),
                             **{f"L{k + 1}": f"{loss_ema[k]:.3f}" for k in range(cfg.K)}, "img/s": f"{ips:.0f}"})
            if step % a.log_every == 0:
                logf.write(json.dumps({"step": step, "lr": lr, "ratios": ratios, "weights": weights,
                                       "stage_loss": loss_ema, "grad_norm": grad_norm, "img_per_s": round(ips, 1),
                                       "elapsed_s": round(time.time() - t0, 1)}) + "\n")
                logf.flush()
        if step % a.save_every == 0:
            full = runs.full_state(model, opt, ema, a.fsdp)
            if master:
                runs.save_checkpoint(run, meta, step, time.time() - t0, loss_ema, *full)
            saved = step
    bar.close()
    if master:
        logf.close()
        if SKIPPED["n"]:
            print(f"skipped {SKIPPED['n']} unusable image(s) (corrupt, too small or too large); training went on "
                  f"without them")

    finished = not stop["signal"] and step != a.stop_at
    bridge = finished and a.transition == "bridge"
    model_sd, optim_sd, ema_sd = runs.full_state(model, opt, ema, a.fsdp)
    if master:
        if bridge:
            fit_bridge(ema_sd, get_batch, cfg, a, enc, vae, step)
            meta["sample"]["bridge_fitted"] = True
        # not the same checkpoint twice, but a resumed run that trained no step records its new flags
        if saved != step or bridge or step == start:
            runs.save_checkpoint(run, meta, step, time.time() - t0, loss_ema, model_sd, optim_sd, ema_sd)
        how = "" if finished else f" (continue with: python train.py --resume {run})"
        by = f" by {signal.Signals(stop['signal']).name}" if stop["signal"] else ""
        print(f"{'finished' if finished else 'stopped' + by} at step {step} after {(time.time() - t0) / 60:.1f} min; "
              f"saved {run}{how}")
        if finished:
            plot_losses(run)
            sample_grid(cfg, ema_sd, a, enc, vae, run, get_batch)


def start_distributed(a):
    """torchrun: join the process group; each rank takes the GPU of its LOCAL_RANK."""
    dist.init_process_group("nccl" if a.device.startswith("cuda") else "gloo")
    if a.device.startswith("cuda"):
        a.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(a.device)


def build(cfg, a, st, distributed, run, init=None):
    """Model, the module a step calls (plain / DDP / FSDP2), AdamW and the EMA weights, restored
    from the run's state.pt `st` on --resume or started from the model `init` (--init-from).
    Returns them and (start step, elapsed s, loss EMA)."""
    dev = torch.device(a.device)
    torch.manual_seed(a.seed)                             # same initial weights on every rank
    model = nami.NAMI(cfg).to(dev)
    model.bridge.requires_grad_(False)                    # fitted by least squares, not by gradients
    model.grad_checkpointing = a.checkpointing
    path = os.path.join(runs.checkpoint_dir(run), "state.pt")
    if st:
        runs.load_weights(model, st["model"], path)       # full weights, before any sharding
    elif init is not None:
        model.load_state_dict(init.state_dict())
    if a.compile:   # per block: tiny compiles in ~1.7 min cold instead of ~3.5, each step ~10% slower
        nami.compile_stages(model, per_block=True)
    step_fn = runs.wrap(model, a.fsdp, distributed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr, betas=(0.9, a.beta2),
                            weight_decay=0.0, fused=not a.fsdp)
    ema = {k: v.detach().clone().float() for k, v in model.state_dict().items()}   # sharded like the model
    resumed = (0, 0.0, [1.0] * cfg.K)
    if st:
        try:
            runs.load_state(model, opt, ema, st, a.fsdp)
        except (RuntimeError, KeyError, ValueError, IndexError) as e:
            raise ValueError(f"{path}: its optimizer state or EMA weights do not fit the model "
                             f"({type(e).__name__}: {str(e).strip()[:200]}); the file is damaged or from another run") from None
        resumed = (int(st["step"]), float(st["elapsed_s"]), st["loss_ema"].tolist())
    return model, step_fn, opt, ema, resumed


def accumulate_gradients(step_fn, get_batch, enc, a, step, ratios, weights, K, rank, world, distributed,
                         start_share=0.0):
    """Forward and backward over the step's --grad-accum micro-batches (caption drop for CFG);
    start_share as in nami_loss. Returns the per-stage loss sums and sample counts of the global batch."""
    dev = torch.device(a.device)
    stage_sum, stage_n = torch.zeros(K, dtype=torch.float64), torch.zeros(K, dtype=torch.float64)
    for micro in range(a.grad_accum):
        g = torch.Generator(dev).manual_seed(step_seed(a.seed, step, micro, 0))
        x, captions, native = get_batch(step * a.grad_accum + micro)
        drop = torch.rand(len(captions) * world, generator=torch.Generator().manual_seed(step_seed(a.seed, step, micro, 1)))
        captions = ["" if d < CAPTION_DROP else c for c, d in zip(captions, drop[rank::world])]
        text = data.encode_text(enc, captions, dev)
        sync = micro == a.grad_accum - 1                  # reduce gradients on the last micro-batch only
        ctx = step_fn.no_sync() if (distributed and not a.fsdp and not sync) else contextlib.nullcontext()
        if a.fsdp:
            step_fn.set_requires_gradient_sync(sync)
        # FSDP keeps bf16 copies of the weights for compute; autocast casts the activations
        # that arrive in fp32 (time embeddings, RoPE, text states) to meet them
        with ctx, torch.autocast(dev.type, torch.bfloat16, enabled=a.dtype == "bf16" or a.fsdp):
            loss, per, counts = step_fn(x, text, ratios, weights, None if native is None else native.to(dev),
                                        g, (rank, world), start_share)
            (loss / a.grad_accum).backward()
        for k in per:
            stage_sum[k - 1] += per[k].item() * counts[k]
            stage_n[k - 1] += counts[k]
    if distributed:                                       # every rank uses the same loss weights
        both = torch.cat([stage_sum, stage_n]).to(dev)
        dist.all_reduce(both)
        stage_sum, stage_n = both.cpu().double().chunk(2)
    return stage_sum, stage_n


def clip_gradients(model):
    """Clip the gradient norm to 1; returns the norm before clipping. Parameters nami_loss left
    without a gradient (stages with no samples) get zeros first, as they would from an empty
    batch: AdamW then steps them (by 0) and counts the step, so their moments' bias correction
    at the first real gradient is the same as when every stage ran every step."""
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    return float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)


def check_finite(stage_sum, grad_norm, step, a, run, saved):
    """A non-finite loss or gradient stops the run before the optimizer step, so neither the
    weights nor the checkpoint on disk ever hold it (every rank sees the same reduced values)."""
    if math.isfinite(grad_norm) and bool(torch.isfinite(stage_sum).all()):
        return
    lower = min(a.lr / 10, nami.TRAIN.get(a.preset, {}).get("lr", a.lr / 10))
    again = (f"{run} keeps its checkpoint of step {saved}: continue with python train.py --resume {run} --lr {lower:g}"
             if saved is not None else f"nothing was saved: run the same command with --lr {lower:g}")
    raise FloatingPointError(f"step {step + 1}: the loss or its gradient is not finite (grad norm {grad_norm}); "
                             f"training stopped before the optimizer step, so it reached neither the weights nor "
                             f"the disk. {again}. A lower --lr (now {a.lr:g}) or a longer --warmup (now {a.warmup})"
                             + (" or --dtype fp32" if a.dtype == "bf16" else "") + " usually cures it")


def optimizer_step(model, opt, ema, ema_decay, step):
    """Step AdamW, update the EMA weights (warmed up over early steps)."""
    opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        decay = min(ema_decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            ema[k].lerp_(v.float(), 1 - decay) if v.dtype.is_floating_point else ema[k].copy_(v)


def update_loss_ema(loss_ema, stage_sum, stage_n, step):
    """Smoothed per-stage losses (the dynamic weights' input), in place."""
    for k in range(len(loss_ema)):
        if stage_n[k] > 0:
            mean = float(stage_sum[k] / stage_n[k])
            loss_ema[k] = mean if step == 0 else LOSS_EMA * loss_ema[k] + (1 - LOSS_EMA) * mean


def fit_bridge(ema, get_batch, cfg, a, enc, vae, step, batches=8):
    """BridgeFlow pre-training: fit each jump on the EMA model's own end points of the
    previous window (sampled from training starts of real data), then store it in the EMA."""
    dev = torch.device(a.device)
    m = runs.model_from_state(cfg, ema, dev)
    bounds, steps = nami.window_bounds(cfg.windows), nami.parse_steps(a.sample_steps, cfg.K)
    g = torch.Generator(dev).manual_seed(a.seed + 1)

    def stage_end(start, k):                              # window k of the sampler, from `start`
        return nami.sample(m, stage_end.text, steps=steps[k - 1: k], noise=start, first=k, last=k)[0]

    with torch.no_grad():
        for k in range(2, cfg.K + 1):
            def pairs():
                for i in range(batches):
                    x, captions, _ = get_batch(step + i)
                    stage_end.text = data.encode_text(enc, captions, dev)
                    yield nami.bridge_pairs(nami.down(x, 2 ** (cfg.K - k)), k, bounds, g, stage_end)
            mse = m.bridge.fit(k, pairs())
            print(f"BridgeFlow jump {k - 1}->{k}: fitted on {batches} batches of model end points, MSE {mse:.4f}")
    for k, v in m.state_dict().items():
        if k.startswith("bridge."):
            ema[k].copy_(v)


def sample_grid(cfg, ema, a, enc, vae, run, get_batch):
    """The end-of-run pictures, labelled: samples.png (4 per prompt) and stages.png (each
    window's end point for one sample per prompt). Prompts: the shapes world's preview set, or
    the first distinct captions of the run's own data."""
    m = runs.model_from_state(cfg, ema, a.device)
    prompts = shapes.PREVIEW_PROMPTS if is_shapes(a.data) else list(dict.fromkeys(get_batch(0)[1]))[:8]
    steps = nami.parse_steps(a.sample_steps, cfg.K)
    images, ends = runs.generate(m, enc, [q for q in prompts for _ in range(4)], steps, a.cfg, a.seed,
                                 a.transition, "nami", 64, vae, a.dtype)
    factor = vae.factor if vae is not None else 1
    data.save_png(runs.sample_sheet(images, prompts, 4), os.path.join(run, "samples.png"))
    data.save_png(runs.stage_sheet([e[::4] for e in ends], prompts, cfg, factor), os.path.join(run, "stages.png"))
    for name in ("samples", "stages"):
        with open(os.path.join(run, f"{name}.txt"), "w") as f:
            f.write("\n".join(prompts) + "\n")
    print(f"wrote {run}/samples.png and {run}/stages.png")


def plot_losses(run):
    """loss.png from the run's log.jsonl: the smoothed loss of each stage (the bar's L1, L2, L3),
    and the learning rate."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(os.path.join(run, "log.jsonl")) as f:
        log = [json.loads(line) for line in f if line.strip()]
    if len(log) < 2:
        return
    steps = [r["step"] for r in log]
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    for k in range(len(log[0]["stage_loss"])):
        ax.plot(steps, [r["stage_loss"][k] for r in log], label=f"stage {k + 1} (L{k + 1})")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("per-stage loss (EMA)")
    ax.grid(alpha=0.3)
    lr = ax.twinx()
    lr.plot(steps, [r["lr"] for r in log], color="grey", lw=0.8, ls="--")
    lr.set_ylabel("learning rate", color="grey")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(os.path.basename(os.path.normpath(run)), fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(run, "loss.png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    runs.cli(main)
