"""
Run folders and checkpoints: the one place that writes and reads what training produces.

A run folder (train.py's OUT/NAME) holds
  config.json          the model Config, the training flags, the sampling defaults, the step,
                       and "checkpoint": the name of the step folder that belongs to them
  step_0000400/        the checkpoint: state.pt (raw weights + optimizer + step for --resume;
                       tensors only, loaded weights_only) and model.safetensors (EMA weights:
                       what sampling loads; safetensors, so nothing is unpickled)
  log.jsonl            one line of per-stage losses every --log-every steps
  train.lock           held (flock) by the one train.py that writes the folder
  samples.png, stages.png (+ .txt with their prompts)   the end-of-run pictures

A checkpoint is one unit. A save writes both files into step_N.tmp/, renames that folder to
step_N/, then renames a new config.json naming step_N into place: that rename is the commit.
Older step folders are deleted only after it. So a kill at any instant leaves config.json
naming a complete folder of one step; the debris (*.tmp, step folders config.json does not
name) is swept when train.py next takes the folder. Run folders from before this layout
(state.pt and model.safetensors next to config.json, no "checkpoint" key) load and resume as
they are; their next save moves them to the new layout.

Also here: `generate`, which turns a loaded run (model + encoders + VAE) into images, shared by
train.py's end-of-run pictures and sample.py; and `cli`, how both entry points report a user
error: one line, no traceback.
"""
import errno
import fcntl
import json
import math
import os
import pickle
import re
import shutil
import sys
import warnings
from dataclasses import asdict, fields

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import data
import nami

LOCK = "train.lock"
STEP_DIR = re.compile(r"step_\d+(\.\d+)?")                # what config.json may name: never a path
RUN_FILES = ("config.json", "log.jsonl", "loss.png", "state.pt", "model.safetensors", "samples.png", "samples.txt",
             "stages.png", "stages.txt")


# -----------------------------------------------------------------------------
# Entry points: a user error is one line


# Raised for bad flags, files and setups: `cli` prints them as `error: ...`. Anything else is a
# bug and keeps its traceback. FloatingPointError is a diverged run.
USER_ERRORS = (ValueError, OSError, FloatingPointError, pickle.UnpicklingError)


def cli(main):
    """Run main() as a script: a user error prints `error: ...` and exits 1 (NAMI_TRACEBACK=1
    shows the traceback). Called from tests, main(argv) raises as usual."""
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"   # one line, no source
    try:
        main()
    except USER_ERRORS as e:
        if os.environ.get("NAMI_TRACEBACK"):
            raise
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:                             # Ctrl-C before training started
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def check_device(name):
    """--device NAME as a torch.device, or a clear error for one this machine does not have."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device name; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this torch build sees no CUDA GPU "
                         f"(torch.cuda.is_available() is False); use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: only cpu and cuda are supported")
    return dev


# -----------------------------------------------------------------------------
# config.json


def train_dtype(device):
    """Default training precision: bf16 autocast on GPUs and on CPUs with bf16 dot-product
    instructions (AVX512-BF16, AMX), where its matrix products run 2x fp32's (EXPERIMENTS 10);
    fp32 on other CPUs, which emulate bf16 and run it slower."""
    if str(device).startswith("cuda"):
        return "bf16"
    native = str(device) == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return "bf16" if native else "fp32"


def check_field(name, value, where):
    """One Config field as saved or typed: the default's type, finite, positive (double may be
    0). A damaged or hand-edited value fails here, naming the field, not deep inside the model."""
    default = getattr(nami.Config(), name)
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, tuple):
        value = tuple(value) if isinstance(value, (list, tuple)) else value
        ints = name == "stage_layers"
        ok = (isinstance(value, tuple) and (len(value) > 0 or name == "rope_axes")
              and all(number(v) and math.isfinite(v) and (v > 0 or name == "rope_axes" and v == 0)
                      and (isinstance(v, int) or not ints) for v in value))
    else:
        ok = (number(value) and (isinstance(value, int) or isinstance(default, float)) and math.isfinite(value)
              and (value >= 0 if name in ("double", "pp_levels") else value > 0))
    if not ok:
        kind = ("true or false" if isinstance(default, bool) else "a string" if isinstance(default, str) else
                "a list of positive ints" if name == "stage_layers" else "a list of positive numbers"
                if isinstance(default, tuple) else f"a {'non-negative' if name in ('double', 'pp_levels') else 'positive'} "
                                                   f"{type(default).__name__}")
        raise ValueError(f"{where}: {name} must be {kind}, got {value!r}")
    return value


def config_from_json(d, where="config.json"):
    """Config from its saved dict (JSON turns tuples into lists), every field checked."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: 'model' must be a JSON object of Config fields, got {type(d).__name__}")
    if "timesteps" not in d:
        raise ValueError(f"{where}: this run was saved by an older version of this code (before the release-"
                         f"compatible model of 2026-12-01: fixed-length text, SiLU conditioning), which computes a "
                         f"different function; retrain it, or sample it with `git checkout 14e2e71`")
    kw = {f.name: check_field(f.name, d[f.name], where) for f in fields(nami.Config) if f.name in d}
    try:
        return nami.Config(**kw).check()
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def read_meta(run):
    """A run folder's config.json, checked for the parts everything else relies on."""
    path = os.path.join(run, "config.json")
    if not os.path.isfile(path):
        parent, name = os.path.split(os.path.normpath(run))
        raise FileNotFoundError(f"no checkpoint in {run!r}: expected config.json and model.safetensors written "
                                f"by train.py (train one with: python train.py --out {parent or '.'} --name {name})")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:          # JSONDecodeError is a ValueError
        raise ValueError(f"{path} is not valid JSON ({e}); it is damaged: restore it from a copy") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise ValueError(f"{path} is not a train.py run config: expected a JSON object with a 'model' "
                         f"object of Config fields")
    for key, kind in (("args", dict), ("sample", dict), ("step", int), ("checkpoint", str)):
        if key in meta and not isinstance(meta[key], kind) or key == "step" and meta.get("step", 0) < 0:
            raise ValueError(f"{path}: '{key}' is {meta[key]!r}, not a valid {kind.__name__}")
    if "checkpoint" in meta and not STEP_DIR.fullmatch(meta["checkpoint"]):
        raise ValueError(f"{path}: 'checkpoint' must name a step folder such as step_0000400, "
                         f"got {meta['checkpoint']!r}")
    return meta


def checkpoint_dir(run, meta=None):
    """The folder holding state.pt and model.safetensors: the step folder config.json names,
    else (runs saved before step folders, or no config.json at all) the run folder itself."""
    if meta is None and os.path.isfile(os.path.join(run, "config.json")):
        meta = read_meta(run)
    return os.path.join(run, meta["checkpoint"]) if meta and "checkpoint" in meta else run


def has_checkpoint(run):
    return os.path.isfile(os.path.join(run, "config.json")) or os.path.isfile(os.path.join(run, "state.pt"))


# -----------------------------------------------------------------------------
# Taking a run folder: one writer, created once


def claim(run, resume=False, overwrite=False):
    """Take RUN for one train.py: create it, lock it, sweep a killed save's debris. A fresh run
    into a folder that already holds one is refused unless `overwrite`, which deletes the old
    run's files first (never files train.py did not write). Returns the lock for `release`."""
    if os.path.exists(run) and not os.path.isdir(run):
        raise FileExistsError(f"run folder {run} is a file: pick another --out or --name")
    os.makedirs(run, exist_ok=True)
    lock = _lock(run)
    try:
        if not resume:
            ours = lambda f: f in RUN_FILES or f == LOCK or f.endswith(".tmp") or STEP_DIR.fullmatch(f)
            held = has_checkpoint(run)
            if held and not overwrite:
                step = _quiet(lambda: read_meta(run).get("step"))
                raise FileExistsError(f"{run} already holds a run{f' (step {step})' if step is not None else ''}: "
                                      f"continue it with `python train.py --resume {run}`, train another with a "
                                      f"new --name, or pass --overwrite to replace it")
            others = sorted(f for f in os.listdir(run) if not ours(f))
            if others and not overwrite:
                raise FileExistsError(f"{run} is not empty (holds {', '.join(others[:3])}): pick another --name "
                                      f"or --out for the run (--overwrite would keep those files and add a run)")
            for f in os.listdir(run):                     # log.jsonl too: a new run starts a new log
                if ours(f) and f != LOCK:
                    _remove(os.path.join(run, f))
        committed = os.path.isfile(os.path.join(run, "config.json"))    # a damaged one raises: sweep nothing
        _sweep(run, read_meta(run).get("checkpoint", "") if committed else "")
    except BaseException:
        release(lock)
        raise
    return lock


def _lock(run):
    """flock RUN/train.lock. The kernel drops the lock when its process dies, so a crashed run
    never blocks the next one; the pid written inside is only for the message."""
    path = os.path.join(run, LOCK)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise FileExistsError(f"{run} is in use by another train.py (pid {pid}, lock {path}): wait for "
                                  f"it to finish or stop it; two writers would mix their checkpoints") from None
        try:                                              # a releasing run may have unlinked the file
            same = os.stat(path).st_ino == os.fstat(fd).st_ino    # between our open and our flock
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return run, fd
        os.close(fd)


def release(lock):
    """Drop the lock; a folder left empty (a run that failed before writing anything) goes too."""
    run, fd = lock
    _quiet(lambda: os.unlink(os.path.join(run, LOCK)))
    os.close(fd)
    _quiet(lambda: os.rmdir(run))                         # only succeeds if empty


def _sweep(run, keep):
    """Delete what a killed save leaves behind: *.tmp, step folders other than `keep` and, once
    a step folder holds the checkpoint, the top-level files of the old layout."""
    for f in os.listdir(run):
        stale = f.endswith(".tmp") or (STEP_DIR.fullmatch(f) and f != keep)
        stale = stale or (keep and f in ("state.pt", "model.safetensors"))
        if stale:
            _remove(os.path.join(run, f))


def _remove(path):
    shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)


def _short(e, line=0):
    """One line of an exception's text, for a message of our own."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[line][:200]}" if lines else type(e).__name__


def _quiet(fn):
    try:
        return fn()
    except (OSError, ValueError):
        return None


def open_log(run, start):
    """log.jsonl for appending from step `start`: lines of later steps (written by a run that
    was killed before saving them) are dropped, so each step is logged once."""
    path = os.path.join(run, "log.jsonl")
    if start and os.path.isfile(path):
        keep = []
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= start:
                        keep.append(line if line.endswith("\n") else line + "\n")
                except (ValueError, KeyError, TypeError):   # a line cut by a kill
                    pass
        data.atomic(path, lambda p: open(p, "w", encoding="utf-8").writelines(keep))
    return open(path, "a" if start else "w", encoding="utf-8")


# -----------------------------------------------------------------------------
# Saving and loading checkpoints


def nonfinite(tensors):
    """Names of the floating-point tensors that hold NaN or inf."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def save_checkpoint(run, meta, step, elapsed, loss_ema, model_sd, optim_sd, ema_sd):
    """state.pt (everything --resume needs) and model.safetensors (EMA, for sampling), committed
    as one unit by config.json (see the module docstring). Non-finite weights are refused, so a
    diverged run can never replace a good checkpoint. Returns the meta as written."""
    bad = nonfinite(model_sd) + nonfinite(ema_sd)
    if bad:
        raise FloatingPointError(f"refusing to save step {step}: {len(bad)} weight tensor(s) hold NaN or inf "
                                 f"(e.g. {bad[0]}); {run} keeps its last good checkpoint. Try a lower --lr")
    name = f"step_{step:07d}"
    name = next(n for n in [name] + [f"{name}.{i}" for i in range(1, 1 << 20)]   # a re-save of a step
                if not os.path.exists(os.path.join(run, n)))                       # gets a fresh folder
    tmp, final = os.path.join(run, name + ".tmp"), os.path.join(run, name)
    meta = {**meta, "step": step, "checkpoint": name}
    try:
        os.makedirs(tmp)
        torch.save({"step": torch.tensor(step), "elapsed_s": torch.tensor(elapsed), "model": model_sd, "ema": ema_sd,
                    "optim": optim_sd, "loss_ema": torch.tensor(loss_ema, dtype=torch.float64)},
                   os.path.join(tmp, "state.pt"))
        save_file({k: v.contiguous() for k, v in ema_sd.items()}, os.path.join(tmp, "model.safetensors"))
        for f in os.listdir(tmp):
            _durable(os.path.join(tmp, f))
        os.rename(tmp, final)
        data.atomic(os.path.join(run, "config.json"), lambda p: _write_json(p, meta))   # the commit
    except BaseException as e:
        full = _disk_full(e, run)
        committed = _quiet(lambda: read_meta(run).get("checkpoint")) == name
        for p in (tmp, final) if not committed else ():   # config.json still names the old folder
            if os.path.isdir(p):
                shutil.rmtree(p, ignore_errors=True)
        if full:
            raise OSError(errno.ENOSPC, f"disk full while saving step {step} to {run}: nothing of it was kept "
                                        f"and the previous checkpoint is intact; free space, then resume "
                                        f"with: python train.py --resume {run}") from None
        raise
    _sweep(run, name)
    return meta


def _durable(path):
    """The files a commit names must hold their bytes even after a power cut; and safetensors
    writes 0600, where the other files follow the umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=1))
        f.flush()
        os.fsync(f.fileno())


def _disk_full(e, folder):
    """torch's zip writer reports a full disk as a short write ('unexpected pos'), not ENOSPC."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if not isinstance(e, (OSError, RuntimeError)):
        return False
    return bool(_quiet(lambda: shutil.disk_usage(folder).free < 16 << 20))


def load_checkpoint(run, K=None):
    """state.pt of a run, for --resume: tensors only (weights_only), never arbitrary objects,
    and checked, so a damaged file fails here with its name rather than deep inside torch."""
    path = os.path.join(checkpoint_dir(run), "state.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume {run}: no state.pt there (a run saves one every --save-every "
                                f"steps, at the end and on Ctrl-C)")
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:                   # torch's text advises weights_only=False: never
        what = [l.strip() for l in str(e).splitlines() if "GLOBAL" in l or "Unsupported" in l][:1] or [_short(e, -1)]
        raise pickle.UnpicklingError(f"{path} holds pickled objects other than tensors; refusing to load it "
                                     f"(train.py never writes such files): {what[0][:200]}") from None
    except Exception as e:                                # damaged: RuntimeError, EOFError, zip errors ...
        raise ValueError(f"{path} is damaged or truncated ({_short(e)}); "
                         f"resume from a copy of the run, or start again") from None
    keys = ("step", "elapsed_s", "model", "ema", "optim", "loss_ema")
    missing = [k for k in keys if not isinstance(st, dict) or k not in st]
    if missing:
        raise ValueError(f"{path} is incomplete (no {', '.join(missing)}); it was not written by train.py")
    ok = (torch.is_tensor(st["step"]) and st["step"].numel() == 1 and not st["step"].is_floating_point()
          and int(st["step"]) >= 0 and torch.is_tensor(st["elapsed_s"]) and math.isfinite(float(st["elapsed_s"]))
          and float(st["elapsed_s"]) >= 0 and torch.is_tensor(st["loss_ema"]) and st["loss_ema"].dim() == 1
          and (K is None or len(st["loss_ema"]) == K) and isinstance(st["model"], dict)
          and isinstance(st["ema"], dict) and isinstance(st["optim"], dict))
    if not ok:
        raise ValueError(f"{path} is damaged: its step, elapsed time or loss EMA are not what train.py writes "
                         f"(step {st['step']!r})")
    return st


def load_weights(module, state_dict, path):
    """module.load_state_dict, with a message naming the file when the two do not fit."""
    try:
        module.load_state_dict(state_dict)
    except (RuntimeError, KeyError, TypeError) as e:
        lines = str(e).strip().splitlines()
        raise ValueError(f"{path} does not fit the model its config.json describes (files of different runs, "
                         f"or edited): {' '.join(l.strip() for l in lines[:3])[:400]}") from None


def load_run(run_dir, device="cpu"):
    """(model, run metadata) from a train.py output folder; weights via safetensors only."""
    for _ in range(3):                                    # a live run may commit a newer step (and
        meta = read_meta(run_dir)                         # delete this one) between our two reads
        path = os.path.join(checkpoint_dir(run_dir, meta), "model.safetensors")
        if os.path.isfile(path):
            break
    cfg = config_from_json(meta["model"], os.path.join(run_dir, "config.json"))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint in {run_dir!r}: {path} is missing (train.py writes it with "
                                f"config.json)")
    try:
        sd = load_file(path)
    except Exception as e:                                # SafetensorError, OSError
        raise ValueError(f"{path} is damaged or truncated ({_short(e)}); if the run has a state.pt, "
                         f"`python train.py --resume {run_dir}` writes it again") from None
    bad = nonfinite(sd)
    if bad:
        raise ValueError(f"{path}: {len(bad)} of {len(sd)} weight tensors hold NaN or inf (e.g. {bad[0]}): the run "
                         f"diverged; its samples would be blank. Train again with a lower --lr")
    model = nami.NAMI(cfg)
    load_weights(model, sd, path)
    return model.to(device).eval(), meta


def load(path, device="cpu"):
    """(model, metadata) from a train.py run folder, or a release / diffusers folder."""
    return load_pretrained(path, device) if is_pretrained_folder(path) else load_run(path, device)


def preset_of(path):
    """The preset whose training recipe suits the weights in `path`: a run's own, 2b for a release."""
    if is_pretrained_folder(path):
        return "2b"
    with open(os.path.join(path, "config.json")) as f:
        preset = json.load(f).get("preset")
    return preset if preset in nami.PRESETS else "2b"


def model_from_state(cfg, state_dict, device):
    """An eval-mode model holding `state_dict` (e.g. the EMA weights at the end of training)."""
    m = nami.NAMI(cfg).to(device).eval()
    m.load_state_dict(state_dict)
    return m


# -----------------------------------------------------------------------------
# Data parallelism: DDP for the small presets, FSDP2 (fully_shard) for 0.6b / 2b; the full
# (gathered) training state that checkpoints hold.


class Objective(torch.nn.Module):
    """The whole multi-stage loss as one module call. nami_loss runs the model once per stage,
    but DDP (and FSDP's root) expect one forward per backward: wrapping the loss gives them that."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return nami.nami_loss(self.model, *args, **kwargs)


def wrap(model, fsdp, distributed):
    """The module a training step calls: plain, DDP, or FSDP2 with every block its own shard
    unit and bf16 compute (fp32 master weights, fp32 gradient reduction)."""
    objective = Objective(model)
    if fsdp:
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
# Generating images from a loaded run.


def to_images(x, vae, size):
    """Model output (B,C,h,w) -> uint8 (B,size,size,3): VAE decode if latent, then nearest
    upsampling to `size` so every stage's end point can sit in one grid."""
    img = vae.decode(x.float()) if vae is not None else x.float()
    img = nami.up(img, size // img.shape[-1])
    return data.to_uint8(img)


def window_labels(cfg, resolution=None, factor=1, variant="nami"):
    """Column labels of a coarse-to-fine strip: each window's image size and noise range."""
    return [f"{cfg.stage_resolution(w.stage, resolution) * factor}px s{w.s:.2f}-{w.e:.2f}"
            for w in nami.plan(cfg, variant)]


def sample_sheet(images, prompts, n):
    """One row per prompt, its n images across, the prompts down the side."""
    scale = max(1, 128 // images.shape[1])
    return data.label(data.grid(images, n, scale), rows=prompts, row_height=images.shape[1] * scale + scale)


def stage_sheet(ends, prompts, cfg, factor=1, resolution=None, variant="nami"):
    """The coarse-to-fine picture: one row per image (its prompt at the side), each window's
    end point across (upsampled), with the window's size and noise range on top."""
    strip = np.stack(ends, 1)                             # (N, K, S, S, 3)
    scale = max(1, 128 // strip.shape[2])
    cell = strip.shape[2] * scale + scale
    return data.label(data.grid(strip.reshape(-1, *strip.shape[2:]), strip.shape[1], scale),
                      cols=window_labels(cfg, resolution, factor, variant), col_width=cell, rows=prompts, row_height=cell)


@torch.no_grad()
def generate(model, enc, prompts, steps, cfg_scale=1.0, seed=0, transition="renoise", variant="nami",
             batch_size=64, vae=None, dtype="fp32", resolution=None, negative=""):
    """Images for `prompts`: uint8 (N,S,S,3) and, per window, its end point (N,S,S,3).
    Guidance pushes away from the `negative` prompt (the empty one by default)."""
    cfg, dev = model.cfg, next(model.parameters()).device
    g = torch.Generator(dev).manual_seed(seed)
    R = resolution or cfg.resolution
    size = R * (vae.factor if vae is not None else 1)
    out, ends = [], None
    batches = range(0, len(prompts), batch_size)
    # disable= only when true: an explicit False would override TQDM_DISABLE=1
    for i in tqdm(batches, desc="sampling", unit="batch", leave=False, **({"disable": True} if len(batches) < 3 else {})):
        chunk = prompts[i: i + batch_size]
        text, uncond = data.encode_text(enc, chunk, dev), data.encode_text(enc, [negative] * len(chunk), dev)
        with torch.autocast(dev.type, torch.bfloat16, enabled=dtype == "bf16"):
            x, stage_ends = nami.sample(model, text, uncond, steps, cfg_scale, transition, variant, R, g)
        out.append(to_images(x, vae, size))
        strips = [to_images(e, vae, size) for e in stage_ends]
        ends = strips if ends is None else [np.concatenate([a, b]) for a, b in zip(ends, strips)]
    return np.concatenate(out), ends


# -----------------------------------------------------------------------------
# Released NAMI-2B and diffusers FLUX weights. The release (360CVGroup/NAMI-T2I, weights on
# the hub as qihoo360/NAMI-T2I) is a folder
#   transformer/pytorch_model_fsdp.bin   a diffusers FluxTransformer2DModel state dict (a torch
#                                        pickle: read with weights_only=True, code is refused)
#   bridge_flow.bin                      BridgeFlow: scale (2,), shift.0 (1,16,64,64), shift.1 (1,16,128,128)
#   vae/   mt5/   mclip/clip_text_encoder/ + mclip/tokenizer/
# A diffusers FluxTransformer2DModel folder (config.json + diffusion_pytorch_model*.safetensors,
# alone or as transformer/ of a FLUX pipeline folder) has the same keys and loads as a K = 1 model.

RELEASE_SAMPLING = {"cfg": 3.0, "steps": "10,10,10", "transition": "bridge"}   # the release's infer.py


def _transformer_folder(folder):
    sub = os.path.join(folder, "transformer")
    return sub if os.path.isdir(sub) else folder


def is_pretrained_folder(folder):
    """A release or diffusers folder (not a train.py run)."""
    t = _transformer_folder(folder)
    return os.path.isfile(os.path.join(t, "pytorch_model_fsdp.bin")) or any(
        f.startswith("diffusion_pytorch_model") for f in (os.listdir(t) if os.path.isdir(t) else []))


def flux_config(d, **kw):
    """nami.Config of a FluxTransformer2DModel config dict: FLUX packs 2x2 latent patches into
    in_channels = 4 C; the release adds stage_singleblock_index (where stage k stops the
    single blocks), without it the model is FLUX's K = 1."""
    if d.get("guidance_embeds"):
        raise ValueError("this FLUX transformer has a guidance embedding (FLUX.1-dev style); only models "
                         "without one (FLUX.1-schnell, the released NAMI-2B) load here")
    if d.get("patch_size", 1) != 1 or d["in_channels"] % 4:
        raise ValueError(f"expected FLUX's packed 2x2 patches (patch_size 1, in_channels = 4 x latent channels), "
                         f"got patch_size {d.get('patch_size')}, in_channels {d['in_channels']}")
    double, single = d["num_layers"], d["num_single_layers"]
    cut = d.get("stage_singleblock_index")
    layers = (double + cut[0], *(b - a for a, b in zip(cut, cut[1:]))) if cut else (double + single,)
    if sum(layers) != double + single:
        raise ValueError(f"stage_singleblock_index {cut} must end at num_single_layers = {single}")
    nested = dict(nami.RELEASE) if cut else dict(
        resolution=128, channels=d["in_channels"] // 4, patch=2, text_dim=d["joint_attention_dim"],
        pooled_dim=d["pooled_projection_dim"], text_len=256, rope_grid="stage", stage_heads=False,
        text_positions=False, windows=(1,))
    nested.update(width=d["num_attention_heads"] * d["attention_head_dim"], heads=d["num_attention_heads"],
                  double=double, stage_layers=layers, channels=d["in_channels"] // 4,
                  text_dim=d["joint_attention_dim"], pooled_dim=d["pooled_projection_dim"],
                  rope_axes=tuple(d.get("axes_dims_rope", (16, 56, 56))), rope_theta=10000.0)
    return nami.Config(**{**nested, **kw}).check()


def flux_to_nami(sd, cfg, bridge=None):
    """A diffusers FLUX state dict (+ the release's bridge_flow.bin) -> this model's state
    dict. Q, K, V (and a single block's MLP input) are concatenated into one linear; FLUX's
    final norm emits (scale, shift), our Head (shift, scale). Any key missing, left over or of
    the wrong shape is an error naming it."""
    sd, out = dict(sd), {}

    def take(key):
        if key not in sd:
            raise KeyError(f"missing key {key!r} in the transformer weights")
        return sd.pop(key)

    def linear(dst, *srcs, swap=False):
        w, b = (torch.cat([take(f"{s}.{p}") for s in srcs]) for p in ("weight", "bias"))
        if swap:
            w, b = (torch.cat(t.chunk(2)[::-1]) for t in (w, b))
        out[f"{dst}.weight"], out[f"{dst}.bias"] = w, b

    linear("img_in", "x_embedder")
    linear("txt_in", "context_embedder")
    for dst, src in (("time_in", "timestep_embedder"), ("vector_in", "text_embedder")):
        linear(f"{dst}.0", f"time_text_embed.{src}.linear_1")
        linear(f"{dst}.2", f"time_text_embed.{src}.linear_2")
    for i in range(cfg.double):
        b, a = f"blocks.{i}", f"transformer_blocks.{i}"
        text_out = i + 1 < cfg.depth                      # an all-double stack's top block: see DoubleBlock
        linear(f"{b}.img_mod", f"{a}.norm1.linear")
        linear(f"{b}.txt_mod", f"{a}.norm1_context.linear")
        if not text_out:                                  # only (shift, scale) feed attention; FLUX's
            for p in ("weight", "bias"):                  # text output of that block reaches nothing
                out[f"{b}.txt_mod.{p}"] = out[f"{b}.txt_mod.{p}"][: 2 * cfg.width]
            for k in [k for k in sd if k.startswith((f"{a}.attn.to_add_out.", f"{a}.ff_context."))]:
                del sd[k]
        linear(f"{b}.img_qkv", *(f"{a}.attn.to_{x}" for x in "qkv"))
        linear(f"{b}.txt_qkv", *(f"{a}.attn.add_{x}_proj" for x in "qkv"))
        for s, q, k in (("img", "norm_q", "norm_k"), ("txt", "norm_added_q", "norm_added_k")):
            out[f"{b}.{s}_norm.q"], out[f"{b}.{s}_norm.k"] = take(f"{a}.attn.{q}.weight"), take(f"{a}.attn.{k}.weight")
        linear(f"{b}.img_proj", f"{a}.attn.to_out.0")
        if text_out:
            linear(f"{b}.txt_proj", f"{a}.attn.to_add_out")
        for s, ff in (("img", "ff"), ("txt", "ff_context"))[: 2 if text_out else 1]:
            linear(f"{b}.{s}_mlp.0", f"{a}.{ff}.net.0.proj")
            linear(f"{b}.{s}_mlp.2", f"{a}.{ff}.net.2")
    for j in range(cfg.depth - cfg.double):
        b, a = f"blocks.{cfg.double + j}", f"single_transformer_blocks.{j}"
        linear(f"{b}.mod", f"{a}.norm.linear")
        linear(f"{b}.linear1", *(f"{a}.attn.to_{x}" for x in "qkv"), f"{a}.proj_mlp")
        linear(f"{b}.linear2", f"{a}.proj_out")
        out[f"{b}.norm.q"], out[f"{b}.norm.k"] = take(f"{a}.attn.norm_q.weight"), take(f"{a}.attn.norm_k.weight")
    linear("heads.0.mod", "norm_out.linear", swap=True)
    linear("heads.0.linear", "proj_out")
    if sd:
        raise KeyError(f"unexpected key(s) in the transformer weights: {sorted(sd)[:5]}"
                       f"{' ...' if len(sd) > 5 else ''} ({len(sd)} in all; is the config right?)")
    for k, v in (bridge or {}).items():
        out[f"bridge.{k}"] = v
    with torch.device("meta"):
        expected = nami.NAMI(cfg).state_dict()
    for k, v in expected.items():
        if k not in out and not (k.startswith("bridge.") and bridge is None):
            raise KeyError(f"missing key {k!r}: no {'bridge_flow.bin entry' if k.startswith('bridge.') else 'weight'} for it")
        if k in out and out[k].shape != v.shape:
            raise ValueError(f"wrong shape for {k!r}: the config expects {tuple(v.shape)}, the file has {tuple(out[k].shape)}")
    extra = set(out) - set(expected)
    if extra:
        raise KeyError(f"unexpected key(s) {sorted(extra)[:5]} for this config")
    return out


def read_pickled_weights(path):
    """A torch .bin state dict, read with weights_only=True: a file carrying code is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:                                # UnpicklingError and friends
        raise ValueError(f"{path}: refused to load (only plain tensors are accepted, never pickled code): "
                         f"{str(e).splitlines()[0]}") from None


def load_pretrained(folder, device="cpu", dtype=None):
    """(model, run metadata) from a release or diffusers folder; see above."""
    t = _transformer_folder(folder)
    cfg_file = os.path.join(t, "config.json")
    d = json.load(open(cfg_file)) if os.path.isfile(cfg_file) else None
    enc = {"text_encoder": os.path.join(folder, "mt5"), "pooled_encoder": os.path.join(folder, "mclip", "clip_text_encoder"),
           "vae": os.path.join(folder, "vae")}
    if not os.path.isdir(enc["text_encoder"]) and os.path.isdir(os.path.join(folder, "text_encoder_2")):
        enc = {"text_encoder": os.path.join(folder, "text_encoder_2"),         # a FLUX pipeline folder
               "pooled_encoder": os.path.join(folder, "text_encoder"), "vae": os.path.join(folder, "vae")}
    bin_file = os.path.join(t, "pytorch_model_fsdp.bin")
    if os.path.isfile(bin_file):                          # the release: its infer.py fixes the 2b config
        bfile = os.path.join(folder, "bridge_flow.bin")
        bridge = read_pickled_weights(bfile) if os.path.isfile(bfile) else None
        if bridge:                                        # its last shift is at the final resolution
            enc["resolution"] = bridge[f"shift.{len(bridge) - 2}"].shape[-1]
        cfg = flux_config(d, **enc) if d else nami.preset("2b", **enc)
        sd = read_pickled_weights(bin_file)
        sampling = RELEASE_SAMPLING if bridge is not None else {**RELEASE_SAMPLING, "transition": "renoise"}
    else:
        if d is None:
            raise FileNotFoundError(f"{folder}: neither the release's transformer/pytorch_model_fsdp.bin nor a "
                                    f"diffusers config.json + diffusion_pytorch_model*.safetensors")
        cfg = flux_config(d, **enc)
        sd = {}
        for f in sorted(os.listdir(t)):
            if f.startswith("diffusion_pytorch_model") and f.endswith(".safetensors"):
                sd.update(load_file(os.path.join(t, f)))
        bridge, sampling = None, {"cfg": 1.0, "steps": "28", "transition": "renoise"}
    if bridge is None and cfg.K > 1:
        print(f"{folder}: no bridge_flow.bin; --transition bridge would use an unfitted bridge")
    state = flux_to_nami(sd, cfg, bridge)
    model = nami.NAMI(cfg)
    missing, _ = model.load_state_dict(state, strict=False)   # flux_to_nami checked every key but the bridge's
    assert all(k.startswith("bridge.") for k in missing), missing
    meta = {"preset": "release" if os.path.isfile(bin_file) else "flux", "model": asdict(cfg), "source": folder,
            "sample": {**sampling, "bridge_fitted": bridge is not None}}
    return model.to(device, dtype).eval(), meta


def convert(folder, out):
    """Write a release / diffusers folder as a run folder (config.json + model.safetensors), so
    that later loads read safetensors and never unpickle."""
    model, meta = load_pretrained(folder)
    os.makedirs(out, exist_ok=True)
    data.atomic(os.path.join(out, "model.safetensors"),
                lambda p: save_file({k: v.contiguous() for k, v in model.state_dict().items()}, p))
    meta["step"] = 0
    data.atomic(os.path.join(out, "config.json"), lambda p: open(p, "w").write(json.dumps(meta, indent=1)))
    return out
