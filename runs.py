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
from dataclasses import fields

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import data
import nami

LOCK = "train.lock"
STEP_DIR = re.compile(r"step_\d+(\.\d+)?")                # what config.json may name: never a path
RUN_FILES = ("config.json", "log.jsonl", "state.pt", "model.safetensors", "samples.png", "samples.txt",
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
        ok = (isinstance(value, tuple) and len(value) > 0 and all(number(v) and math.isfinite(v) and v > 0
                                                                 and (isinstance(v, int) or not ints) for v in value))
    else:
        ok = (number(value) and (isinstance(value, int) or isinstance(default, float)) and math.isfinite(value)
              and (value >= 0 if name == "double" else value > 0))
    if not ok:
        kind = ("true or false" if isinstance(default, bool) else "a string" if isinstance(default, str) else
                "a list of positive ints" if name == "stage_layers" else "a list of positive numbers"
                if isinstance(default, tuple) else f"a {'non-negative' if name == 'double' else 'positive'} "
                                                   f"{type(default).__name__}")
        raise ValueError(f"{where}: {name} must be {kind}, got {value!r}")
    return value


def config_from_json(d, where="config.json"):
    """Config from its saved dict (JSON turns tuples into lists), every field checked. A field
    missing from an old run's file takes its default, as it had then."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: 'model' must be a JSON object of Config fields, got {type(d).__name__}")
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


def model_from_state(cfg, state_dict, device):
    """An eval-mode model holding `state_dict` (e.g. the EMA weights at the end of training)."""
    m = nami.NAMI(cfg).to(device).eval()
    m.load_state_dict(state_dict)
    return m


# -----------------------------------------------------------------------------
# Generating images from a loaded run.


def to_images(x, vae, size):
    """Model output (B,C,h,w) -> uint8 (B,size,size,3): VAE decode if latent, then nearest
    upsampling to `size` so every stage's end point can sit in one grid."""
    img = vae.decode(x.float()) if vae is not None else x.float()
    img = nami.up(img, size // img.shape[-1])
    return data.to_uint8(img)


@torch.no_grad()
def generate(model, enc, prompts, steps, cfg_scale=1.0, seed=0, transition="renoise", variant="nami",
             batch_size=64, vae=None, dtype="fp32", resolution=None):
    """Images for `prompts`: uint8 (N,S,S,3) and, per window, its end point (N,S,S,3)."""
    cfg, dev = model.cfg, next(model.parameters()).device
    g = torch.Generator(dev).manual_seed(seed)
    R = resolution or cfg.resolution
    size = R * (vae.factor if vae is not None else 1)
    out, ends = [], None
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i: i + batch_size]
        text, uncond = data.encode_text(enc, chunk, dev), data.encode_text(enc, [""] * len(chunk), dev)
        with torch.autocast(dev.type, torch.bfloat16, enabled=dtype == "bf16"):
            x, stage_ends = nami.sample(model, text, uncond, steps, cfg_scale, transition, variant, R, g)
        out.append(to_images(x, vae, size))
        strips = [to_images(e, vae, size) for e in stage_ends]
        ends = strips if ends is None else [np.concatenate([a, b]) for a, b in zip(ends, strips)]
    return np.concatenate(out), ends
