"""
Run folders and checkpoints: the one place that writes and reads what training produces.

A run folder (train.py's OUT/NAME) holds
  config.json          the model Config, the training flags and the sampling defaults
  model.safetensors    EMA weights: what sampling loads (safetensors: nothing is unpickled)
  state.pt             raw weights + optimizer + step for --resume (tensors only, weights_only)
  log.jsonl            one line of per-stage losses every --log-every steps
Every file is written to a temporary name and renamed into place.

Also here: `generate`, which turns a loaded run (model + encoders + VAE) into images, shared by
train.py's end-of-run pictures and sample.py.
"""
import json
import os
from dataclasses import fields

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import data
import nami


def config_from_json(d):
    """Config from its saved dict (JSON turns tuples into lists)."""
    names = {f.name for f in fields(nami.Config)}
    return nami.Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}).check()


def save_checkpoint(run, meta, step, elapsed, loss_ema, model_sd, optim_sd, ema_sd):
    """state.pt (everything --resume needs), model.safetensors (EMA, for sampling), config.json."""
    data.atomic(os.path.join(run, "state.pt"), lambda p: torch.save(
        {"step": torch.tensor(step), "elapsed_s": torch.tensor(elapsed), "model": model_sd, "ema": ema_sd,
         "optim": optim_sd, "loss_ema": torch.tensor(loss_ema, dtype=torch.float64)}, p))
    data.atomic(os.path.join(run, "model.safetensors"), lambda p: save_file(
        {k: v.contiguous() for k, v in ema_sd.items()}, p))
    meta["step"] = step
    data.atomic(os.path.join(run, "config.json"), lambda p: open(p, "w").write(json.dumps(meta, indent=1)))


def load_checkpoint(run):
    """state.pt of a run, for --resume: tensors only (weights_only), never arbitrary objects."""
    path = os.path.join(run, "state.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume {run}: no state.pt there (a run saves one every --save-every "
                                f"steps, at the end and on Ctrl-C)")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_run(run_dir, device="cpu"):
    """(model, run metadata) from a train.py output folder; weights via safetensors only."""
    cfg_path, w_path = os.path.join(run_dir, "config.json"), os.path.join(run_dir, "model.safetensors")
    if not (os.path.isfile(cfg_path) and os.path.isfile(w_path)):
        raise FileNotFoundError(f"no checkpoint in {run_dir!r}: expected config.json and model.safetensors "
                                f"written by train.py (train one with: python train.py --out {run_dir})")
    with open(cfg_path) as f:
        meta = json.load(f)
    model = nami.NAMI(config_from_json(meta["model"]))
    model.load_state_dict(load_file(w_path))
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
