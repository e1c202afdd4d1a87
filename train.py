"""
Train NAMI (progressive rectified flow transformers) with the paper's multi-resolution joint
training: every step trains all stages on one batch that mixes resolutions.

  python train.py                                  # tiny preset, built-in shapes world, 2 CPU cores
  python train.py --preset cifar --data cifar:/data/cifar-10-batches-py
  python train.py --data /data/my_images           # imagefolder: metadata.jsonl with file_name, text
  python train.py --preset 2b --dry-run            # parameters, FLOPs per stage, memory per GPU
  torchrun --nproc_per_node=8 train.py --preset 2b --data '/data/laion/{00000..09999}.tar' --fsdp
  python train.py --resume out/tiny                # continue a stopped run exactly where it stopped

Output (out/<run>/): config.json, model.safetensors (EMA weights, what sample.py loads),
state.pt (raw weights + optimizer + step, for --resume; tensors only, loaded weights_only),
log.jsonl (per-stage losses), samples.png + stages.png (+ .txt with their prompts).
"""
import argparse
import contextlib
import json
import os
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
    """Linear warmup over `warmup` steps, then the current phase's multiplier."""
    return base * phase(progress, 3, phases)[1] * min(1.0, (step + 1) / warmup)


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

    if spec == "shapes":
        if (cfg.channels, cfg.resolution) != (3, 32):
            raise ValueError("the shapes world is 32x32 RGB: use a pixel-space preset (tiny, cifar)")

        def get(step):
            images, captions = shapes.make_batch(batch, seed, step)
            return model_space(data.to_tensor(images[rank::world]), captions[rank::world], None)
        return get
    if spec.endswith(".tar") or "{" in spec:              # a stream: resumes at a new shard order
        stream = iter(_loader(data.WebDataset(spec, res, rank, world, seed), batch // world, workers))
        return lambda step: model_space(*_unpack(next(stream)))
    if spec.startswith("cifar:"):
        ds = data.Cifar10(spec[len("cifar:"):])
        if res[-1] != 32:
            raise ValueError(f"CIFAR-10 images are 32x32 but the model's final resolution is {res[-1]} px")
    elif os.path.isdir(spec) and any(f.startswith("latents_") for f in os.listdir(spec)):
        ds = data.LatentFolder(spec)
    else:
        ds = data.ImageFolder(spec, res)
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
        raise RuntimeError("a whole batch was unreadable: check the dataset's images")
    xs, captions, native = zip(*good)
    x = torch.stack(list(xs)) if torch.is_tensor(xs[0]) else data.to_tensor(np.stack(xs))
    return x, list(captions), list(native)


# -----------------------------------------------------------------------------
# Data parallelism: DDP for the small presets, FSDP2 (fully_shard) for 0.6b / 2b.


class Objective(torch.nn.Module):
    """The whole multi-stage loss as one module call. nami_loss runs the model once per stage,
    but DDP (and FSDP's root) expect one forward per backward: wrapping the loss gives them that."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return nami.nami_loss(self.model, *args, **kwargs)


def wrap(model, a, distributed):
    """The module a training step calls: plain, DDP, or FSDP2 with every block its own shard
    unit and bf16 compute (fp32 master weights, fp32 gradient reduction)."""
    objective = Objective(model)
    if a.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for blk in model.blocks:
            fully_shard(blk, mp_policy=mp)
        fully_shard(objective, mp_policy=mp)
    elif distributed:
        objective = torch.nn.parallel.DistributedDataParallel(objective, find_unused_parameters=True)
    return objective


def full_state(model, opt, ema, fsdp):
    """(model, optimizer, EMA) state as full tensors. Under FSDP the shards are gathered, which
    is a collective: every rank calls this, rank 0 writes."""
    if not fsdp:
        return model.state_dict(), opt.state_dict(), ema
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    o = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = lambda v: v.full_tensor().cpu() if hasattr(v, "full_tensor") else v.cpu()
    return (get_model_state_dict(model, options=o), get_optimizer_state_dict(model, opt, options=o),
            {k: full(v) for k, v in ema.items()})


def load_state(model, opt, ema, st, fsdp):
    """Restore a full (gathered) checkpoint into a possibly sharded model, optimizer and EMA."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, opt, st["optim"], options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(st["optim"])
    for k, v in ema.items():
        full = st["ema"][k].to(v.device)
        v.copy_(distribute_tensor(full, v.device_mesh, v.placements) if isinstance(v, DTensor) else full)


# -----------------------------------------------------------------------------
# Built-in report: parameters, FLOPs per stage, memory per GPU.


def memory_estimate(cfg, micro_batch, ranks, checkpointing, fsdp):
    """Bytes per GPU, estimated for bf16 mixed precision with AdamW, worst case (all samples
    at the highest-resolution stage). States: fp32 weights + grads + Adam (2) + EMA = 20 B per
    parameter, divided by the ranks under FSDP. Activations (bf16, flash attention): about
    34 * N * d bytes per layer per sample (Korthikanti et al., 2022) or, with activation
    checkpointing, 2 * N * d per layer (its input) plus one layer's worth in recompute."""
    P = nami.count_params(cfg)
    N = (cfg.resolution // cfg.patch) ** 2 + cfg.text_len
    states = 20 * P / (ranks if fsdp else 1)
    per_layer = 34 * N * cfg.width
    acts = micro_batch * (cfg.depth * 2 * N * cfg.width + per_layer if checkpointing else cfg.depth * per_layer)
    return states, acts


def dry_run(cfg, a, ranks):
    P = nami.count_params(cfg)
    print(f"params: {P / 1e9:.2f}B" if P > 1e9 else f"params: {P / 1e6:.2f}M")
    print(f"stages: {cfg.K}, layers {':'.join(map(str, cfg.stage_layers))} of {cfg.depth} "
          f"({cfg.double} double-stream first), windows {[(round(s, 3), round(e, 3)) for s, e in nami.window_bounds(cfg.windows)]}")
    for k in range(1, cfg.K + 1):
        r = cfg.stage_resolution(k)
        f = nami.forward_flops(cfg, (r // cfg.patch) ** 2, cfg.stage_depth(k))
        print(f"  stage {k}: {r}x{r} cells, {(r // cfg.patch) ** 2} image tokens, {cfg.stage_depth(k)} blocks: "
              f"{f / 1e9:,.1f} GFLOP forward, {3 * f / 1e9:,.1f} GFLOP train step per image")
    steps = nami.parse_steps(a.sample_steps, cfg.K)
    nf = nami.sampling_flops(cfg, steps, cfg_scale=a.cfg)
    bf = nami.sampling_flops(cfg, sum(steps), "baseline", cfg_scale=a.cfg)
    print(f"sampling {sum(steps)} steps (cfg {a.cfg}): NAMI {nf / 1e12:.2f} TFLOP vs uniform baseline "
          f"{bf / 1e12:.2f} TFLOP per image (-{100 * (1 - nf / bf):.1f}%)")
    micro = max(1, a.batch_size // (ranks * a.grad_accum))
    states, acts = memory_estimate(cfg, micro, ranks, a.checkpointing, a.fsdp)
    print(f"memory per GPU (estimate, {ranks} rank(s), micro-batch {micro}, "
          f"{'FSDP' if a.fsdp else 'replicated'}, checkpointing {'on' if a.checkpointing else 'off'}): "
          f"{(states + acts) / 2 ** 30:.1f} GiB = {states / 2 ** 30:.1f} states + {acts / 2 ** 30:.1f} activations")
    if states + acts > 70 * 2 ** 30:
        print("  more than an 80 GB GPU holds: shard the states with --fsdp over more --ranks, add "
              "--checkpointing, or raise --grad-accum to shrink the micro-batch")


# -----------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=list(nami.PRESETS))
    p.add_argument("--data", default="shapes", help="shapes | cifar:PATH | imagefolder PATH | latents PATH | 'shards/{0000..0099}.tar'")
    p.add_argument("--steps", type=int)
    p.add_argument("--minutes", type=float, help="train for this wall-clock budget instead of --steps (ablations)")
    p.add_argument("--batch-size", type=int, help="global batch, over all ranks and accumulation")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float)
    p.add_argument("--beta2", type=float, help="AdamW's second-moment decay (beta1 is 0.9)")
    p.add_argument("--warmup", type=int)
    p.add_argument("--ema", type=float)
    p.add_argument("--phases", choices=list(nami.PHASES), help="resolution ratios over the run (nami.PHASES; default: the preset's)")
    p.add_argument("--loss-weights", choices=["dynamic", "uniform"], default="dynamic")
    p.add_argument("--out", default="out", help="parent folder of runs")
    p.add_argument("--name", help="run name (default: the preset); runs go to OUT/NAME")
    p.add_argument("--resume", help="a run folder to continue")
    p.add_argument("--init-from", metavar="DIR", help="fine-tune: start a new run from these weights (a run folder, "
                   "or the released NAMI-2B's folder); the model config comes from there")
    p.add_argument("--stop-at", type=int, help="stop (and save) at this step, to be resumed later")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"])
    p.add_argument("--dry-run", action="store_true", help="report parameters, FLOPs and memory, then exit")
    p.add_argument("--ranks", type=int, help="with --dry-run: ranks to estimate memory for")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (torchrun), bf16 mixed precision")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile each stage (default: the preset's; the first steps then include compiling)")
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
    a = p.parse_args(argv)
    for action in p._actions:                             # parse again to see which flags were typed
        action.default = argparse.SUPPRESS
    return a, vars(p.parse_args(argv))


def settle_args(a, given):
    """Fill unset flags: from the run being resumed (its own settings, overridden only by the
    flags typed now), else the preset's defaults. --stop-at never carries over."""
    if a.resume:
        path = os.path.join(a.resume, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--resume {a.resume}: not a train.py run folder (expected config.json "
                                    f"and state.pt; a run saves them every --save-every steps and on Ctrl-C)")
        with open(path) as f:
            meta = json.load(f)
        # a run saved before --phases and --beta2 existed trained with the paper's phases and 0.99
        a = argparse.Namespace(**{"phases": "paper", "beta2": 0.99, **meta["args"], "stop_at": None, **given})
    else:
        meta = None
        if a.init_from and "preset" not in given:         # fine-tuning: the recipe of the weights' preset
            a.preset = runs.preset_of(a.init_from)
        for k, v in nami.TRAIN[a.preset].items():
            if getattr(a, k) is None:
                setattr(a, k, v)
        if a.variant.startswith("ppflow") and "sample_steps" not in given:   # 30 steps, split PPFlow's way
            a.sample_steps = ",".join(map(str, nami.default_steps(nami.preset(a.preset, **VARIANTS[a.variant]))))
        if a.dtype is None:                               # CPUs without bf16 matrix units run bf16 slower
            a.dtype = "bf16" if a.device.startswith("cuda") else "fp32"
    if "steps" in given and "minutes" not in given:       # an explicit step count beats a time budget,
        a.minutes = None                                  # the preset's or a resumed run's used-up one
    return a, meta


def step_seed(*parts):
    """One 62-bit seed per (seed, step, micro-batch, purpose): a resumed run redraws exactly."""
    return int.from_bytes(np.random.SeedSequence(list(parts)).generate_state(2, np.uint32).tobytes(), "little") >> 2


def build_config(a, base=None):
    """The preset (or the config of --init-from's weights), with --set overrides (a:b:c = tuple,
    true/false = bool) and the variants."""
    default = nami.Config()
    kw = dict(VARIANTS[a.variant])
    for item in a.set:
        key, _, value = item.partition("=")
        if not hasattr(default, key) or key in ("K", "depth"):
            raise ValueError(f"--set {item}: no Config field {key!r}; fields: "
                             f"{', '.join(f.name for f in fields(nami.Config))}")
        kind = type(getattr(default, key))
        kw[key] = (tuple((float if "." in v else int)(v) for v in value.split(":")) if kind is tuple else
                   value.lower() in ("1", "true", "yes") if kind is bool else kind(value))
    if base is not None:
        return replace(base, **kw).check()
    return nami.preset(a.preset, **kw)


def main(argv=None):
    """The training loop, step by step: settle the flags, build, then train, save, sample."""
    a, meta = settle_args(*parse_args(argv))
    init = runs.load(a.init_from) if a.init_from and not a.resume else None
    cfg = runs.config_from_json(meta["model"]) if meta else build_config(a, init[0].cfg if init else None)
    nami.parse_steps(a.sample_steps, cfg.K)               # bad --sample-steps or stage ratios fail
    stage_ratios(cfg, 0.0, a.phases)                      # fails now, not after training
    distributed = "RANK" in os.environ
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if distributed else (0, 1)
    if a.dry_run:
        return dry_run(cfg, a, a.ranks or world)
    if a.batch_size % (world * a.grad_accum):
        raise ValueError(f"--batch-size {a.batch_size} must divide by ranks x --grad-accum = {world * a.grad_accum}")
    if distributed:
        start_distributed(a)
    master, dev = rank == 0, torch.device(a.device)
    run = a.resume or os.path.join(a.out, a.name or a.preset)

    model, step_fn, opt, ema, resumed = build(cfg, a, run, distributed, init[0].state_dict() if init else None)
    del init
    # finite caption sets (shapes: ~2k, CIFAR: 10) are worth caching; open-ended ones are not
    enc, vae = data.load_encoders(cfg, a.device, 100_000 if a.data == "shapes" or a.data.startswith("cifar:") else 0)
    if a.data == "shapes":                                # its whole grammar, once: ~2 s
        enc.warm([""] + shapes.all_captions())
    get_batch = open_data(a.data, cfg, a.batch_size // a.grad_accum, a.seed, rank, world, a.workers, vae, dev)
    start, elapsed, loss_ema = resumed
    meta = meta or {"preset": a.preset, "model": asdict(cfg), "data": a.data, "text_encoder": enc.id,
                    "vae": cfg.vae, "args": vars(a),
                    "sample": {"cfg": a.cfg, "steps": a.sample_steps, "transition": a.transition}}
    if master:
        os.makedirs(run, exist_ok=True)
        print(f"run {run}: {nami.count_params(cfg) / 1e6:.2f}M parameters, stages "
              f"{[cfg.stage_resolution(k) for k in range(1, cfg.K + 1)]}, layers {cfg.stage_layers}, "
              f"{world} rank(s), batch {a.batch_size}, {a.dtype}")

    stop = {"now": False}
    signal.signal(signal.SIGINT, lambda *_: stop.update(now=True))   # Ctrl-C: finish the step, save
    budget = 60 * a.minutes if a.minutes else None
    total = a.steps if budget is None else 1 << 62
    t0 = time.time() - elapsed                            # a resumed time budget goes on where it stopped
    t_start, seen, logf = time.time(), 0, open(os.path.join(run, "log.jsonl"), "a") if master else None
    bar = tqdm(total=None if budget else total, initial=start, disable=not master, dynamic_ncols=True)
    step = start
    while step < total and not stop["now"] and step != a.stop_at:
        progress = (time.time() - t0) / budget if budget else step / total
        if progress >= 1:
            break
        ratios = stage_ratios(cfg, progress, a.phases)
        lr = learning_rate(a.lr, step, progress, a.warmup, a.phases)
        for group in opt.param_groups:
            group["lr"] = lr
        weights = dynamic_weights(loss_ema) if a.loss_weights == "dynamic" else None
        stage_sum, stage_n = accumulate_gradients(step_fn, get_batch, enc, a, step, ratios, weights, cfg.K,
                                                  rank, world, distributed)
        grad_norm = optimizer_step(model, opt, ema, a.ema, step)
        update_loss_ema(loss_ema, stage_sum, stage_n, step)
        step += 1
        seen += a.batch_size
        if master:
            ips = seen / (time.time() - t_start)
            bar.update(1)
            bar.set_postfix({**{f"L{k + 1}": f"{loss_ema[k]:.3f}" for k in range(cfg.K)}, "img/s": f"{ips:.0f}"})
            if step % a.log_every == 0:
                logf.write(json.dumps({"step": step, "lr": lr, "ratios": ratios, "weights": weights,
                                       "stage_loss": loss_ema, "grad_norm": grad_norm, "img_per_s": round(ips, 1),
                                       "elapsed_s": round(time.time() - t0, 1)}) + "\n")
                logf.flush()
        if step % a.save_every == 0:
            full = full_state(model, opt, ema, a.fsdp)
            if master:
                runs.save_checkpoint(run, meta, step, time.time() - t0, loss_ema, *full)
    bar.close()
    if master and SKIPPED["n"]:
        print(f"skipped {SKIPPED['n']} unreadable image(s) (corrupt or too small); training went on without them")

    finished = not stop["now"] and step != a.stop_at
    model_sd, optim_sd, ema_sd = full_state(model, opt, ema, a.fsdp)
    if master:
        if finished and a.transition == "bridge":
            fit_bridge(ema_sd, get_batch, cfg, a, enc, vae, step)
        runs.save_checkpoint(run, meta, step, time.time() - t0, loss_ema, model_sd, optim_sd, ema_sd)
        print(f"{'finished' if finished else 'stopped'} at step {step} after {(time.time() - t0) / 60:.1f} min; "
              f"saved {run}" + ("" if finished else f" (continue with: python train.py --resume {run})"))
        if finished:
            plot_losses(run)
            sample_grid(cfg, ema_sd, a, enc, vae, run)
    if distributed:
        dist.destroy_process_group()
    return run


def start_distributed(a):
    """torchrun: join the process group; each rank takes the GPU of its LOCAL_RANK."""
    dist.init_process_group("nccl" if a.device.startswith("cuda") else "gloo")
    if a.device.startswith("cuda"):
        a.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(a.device)


def build(cfg, a, run, distributed, init=None):
    """Model, the module a step calls (plain / DDP / FSDP2), AdamW and the EMA weights, restored
    from the run's state.pt on --resume or started from the weights `init` (--init-from).
    Returns them and (start step, elapsed s, loss EMA)."""
    dev = torch.device(a.device)
    torch.manual_seed(a.seed)                             # same initial weights on every rank
    model = nami.NAMI(cfg).to(dev)
    model.bridge.requires_grad_(False)                    # fitted by least squares, not by gradients
    model.grad_checkpointing = a.checkpointing
    if a.compile:
        nami.compile_stages(model)
    st = runs.load_checkpoint(run) if a.resume else None
    if st or init:
        model.load_state_dict(st["model"] if st else init)   # full weights, before any sharding
    step_fn = wrap(model, a, distributed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr, betas=(0.9, a.beta2),
                            weight_decay=0.0, fused=not a.fsdp)
    ema = {k: v.detach().clone().float() for k, v in model.state_dict().items()}   # sharded like the model
    resumed = (0, 0.0, [1.0] * cfg.K)
    if st:
        load_state(model, opt, ema, st, a.fsdp)
        resumed = (int(st["step"]), float(st["elapsed_s"]), st["loss_ema"].tolist())
    return model, step_fn, opt, ema, resumed


def accumulate_gradients(step_fn, get_batch, enc, a, step, ratios, weights, K, rank, world, distributed):
    """Forward and backward over the step's --grad-accum micro-batches (caption drop for CFG).
    Returns the per-stage loss sums and sample counts of the global batch."""
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
                                        g, (rank, world))
            (loss / a.grad_accum).backward()
        for k in per:
            stage_sum[k - 1] += per[k].item() * counts[k]
            stage_n[k - 1] += counts[k]
    if distributed:                                       # every rank uses the same loss weights
        both = torch.cat([stage_sum, stage_n]).to(dev)
        dist.all_reduce(both)
        stage_sum, stage_n = both.cpu().double().chunk(2)
    return stage_sum, stage_n


def optimizer_step(model, opt, ema, ema_decay, step):
    """Clip, step AdamW, update the EMA weights (warmed up over early steps). Returns the grad norm."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        decay = min(ema_decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            ema[k].lerp_(v.float(), 1 - decay) if v.dtype.is_floating_point else ema[k].copy_(v)
    return grad_norm


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


def sample_grid(cfg, ema, a, enc, vae, run):
    """The end-of-run picture: samples.png (4 per prompt) and stages.png (each window's end)."""
    m = runs.model_from_state(cfg, ema, a.device)
    prompts = shapes.PREVIEW_PROMPTS if a.data == "shapes" else ["a photo"] * 8
    steps = nami.parse_steps(a.sample_steps, cfg.K)
    images, ends = runs.generate(m, enc, [q for q in prompts for _ in range(4)], steps, a.cfg, a.seed,
                                 a.transition, "nami", 64, vae, a.dtype)
    scale = max(1, 96 // images.shape[1])
    data.save_png(data.grid(images, 4, scale), os.path.join(run, "samples.png"))
    strip = np.stack([e[::4] for e in ends], 1)           # first sample of each prompt, per window
    data.save_png(data.grid(strip.reshape(-1, *strip.shape[2:]), cfg.K, scale), os.path.join(run, "stages.png"))
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
    main()
