"""
Sample from a trained NAMI run: a PNG grid, one PNG per prompt, the coarse-to-fine stage
strip (the paper's Figure 3), or the shapes-world evaluation (GenEval-style accuracy).

  python sample.py --ckpt out/tiny --prompt "two red circles" --prompt "a blue square"
  python sample.py --ckpt out/tiny --prompt "a red circle above a white square" --stages --n 4
  python sample.py --ckpt out/tiny --prompts-file prompts.txt --out samples/   # 0000.png ... + grid.png
  python sample.py --ckpt out/tiny --eval              # one JSON line: accuracy per category
  python sample.py --ckpt out/tiny --stage-check       # which stage loses accuracy (see stage_check)
  python sample.py --preset 2b --random-weights ...    # untrained weights: checks the whole path

Steps are per window (`--sample-steps 10,10,10`); `--transition bridge` uses the run's fitted
BridgeFlow; `--variant piecewise|baseline` runs the same weights without nesting / windows.
Next to the grid X.png goes X.png.txt, its prompts (one row per line). The encoders and VAE a
run's config.json names load only from disk (a folder, the HF cache): a run folder someone
sent you cannot make this script download anything. Typing --text-encoder / --pooled-encoder /
--vae ID allows that id's download.
"""
import argparse
import dataclasses
import json
import math
import os
import re
import sys
import tempfile
import time

import numpy as np
import torch

import data
import nami
import runs
import shapes


@torch.no_grad()
def stage_check(model, enc, steps, cfg_scale=1.0, seed=0, n=120, transition="renoise"):
    """Which stage loses accuracy? When sampling starts in window k (k = 1..K) from real
    shapes-world renders noised to that window's start, the state stage k trains from,
    (1-s_k) Up(Down(x_k)) + s_k noise: single-object accuracy per shape, and for position
    scenes the accuracy and the direction (of the images with the right objects on the
    right axis, the fraction in the asked order). Window 1 is the plain sampler; a drop from
    window k+1 to window k means stage k does not settle what it should."""
    cfg, dev = model.cfg, next(model.parameters()).device
    rng, g = np.random.default_rng(seed), torch.Generator(dev).manual_seed(seed)
    captions, objects = zip(*(shapes.sample_scene(rng, form) for form in ("single", "position") for _ in range(n)))
    x = data.to_tensor(np.stack([shapes.render(o) for o in objects])).to(dev)
    text, uncond = data.encode_text(enc, captions, dev), data.encode_text(enc, [""] * len(captions), dev)
    result = {}
    for k, (s, e) in enumerate(cfg.bounds(), 1):
        xk = nami.down(x, 2 ** (cfg.K - k))                                   # (2n, 3, R_k, R_k)
        noise = torch.randn(xk.shape, generator=g, device=dev)
        start = nami.training_point(xk, noise, (s, e), torch.zeros(len(x), device=dev))[0]
        out, _ = nami.sample(model, text, uncond, steps[k - 1:], cfg_scale, transition, generator=g,
                             noise=start, first=k)
        images, ok = data.to_uint8(out), {}
        for caption, image in zip(captions[:n], images[:n]):
            ok.setdefault(caption.split()[-1], []).append(shapes.score(caption, image)["single"])
        order = [d for c, im in zip(captions[n:], images[n:]) if (d := shapes.direction(c, im)) is not None]
        mean = lambda v: round(float(np.mean(v)), 3) if len(v) else None
        result[f"from_window_{k}"] = {**{sh: mean(ok.get(sh, [])) for sh in shapes.SHAPES},
                                      "all": mean([v for vs in ok.values() for v in vs]),
                                      "position": mean([shapes.score(c, im)["position"]
                                                        for c, im in zip(captions[n:], images[n:])]),
                                      "direction": mean(order)}
        print(f"from window {k}: {result[f'from_window_{k}']}", file=sys.stderr, flush=True)
    return result


def first_guess_scenes(seed=0, n=48):
    """first_guess's position scenes: two objects of different colours, so colour tells them apart."""
    rng, scenes = np.random.default_rng(seed), []
    while len(scenes) < n:
        caption, objects = shapes.sample_scene(rng, "position")
        if objects[0][0] != objects[1][0]:
            scenes.append((caption, objects))
    return scenes


@torch.no_grad()
def first_guess(model, enc, seed=0, n=48, draws=32):
    """Does the model read a relation before it has any layout to follow? Window 1 starts from
    pure noise x, so its one-step estimate of the data, x0 = (x_end - e_1 x) / (1 - e_1), holds
    the layout the caption alone asks for; its mean over `draws` noises is the model's
    E[x0 | caption], the mean image. In it each object's colour mass has a centroid; the first-named object's
    offset from the second along the relation's axis, signed so that + is the asked side,
    averaged over n position scenes, in stage-1 pixels: "offset". "data" is the same offset
    in the scenes themselves (~3.7 px). A model that reads the relation lands near data, one
    that places objects by what they are rather than by the relation near 0."""
    cfg, dev = model.cfg, next(model.parameters()).device
    win, f = nami.plan(cfg)[0], cfg.resolution // cfg.stage_resolution(1)     # f: image px per stage-1 px
    scenes, g = first_guess_scenes(seed, n), torch.Generator(dev).manual_seed(seed)
    text = data.encode_text(enc, [c for c, _ in scenes for _ in range(draws)], dev)
    x = nami.start_noise(cfg, n * draws, cfg.resolution, cfg.stage_resolution(1), g, dev)
    v = model(x, torch.full((len(x),), win.time(1.0), device=dev), text, win.stage, win.depth)
    x0 = (x - win.unit * v - win.e * x) / (1 - win.e)                  # Euler l = 1 -> 0, then undo the noise
    mean = x0.float().unflatten(0, (n, draws)).mean(1).clamp(-1, 1).add(1).div(2).cpu().numpy()  # (n, 3, h, w)
    ys, xs = np.mgrid[0:mean.shape[-2], 0:mean.shape[-1]]
    offset, truth = [], []
    for (caption, objects), img in zip(scenes, mean):
        rel = shapes.parse_caption(caption)["relation"]
        axis, sign = (0 if rel in ("to the left of", "to the right of") else 1), (-1 if rel in ("to the left of", "above") else 1)
        at = []
        for colour, *_ in objects[:2]:                                 # w: closeness to the colour
            w = np.clip(1 - np.abs(img - np.array(shapes.COLOURS[colour])[:, None, None] / 255).sum(0), 0, None) ** 2
            at.append(((w * xs).sum() / max(w.sum(), 1e-9), (w * ys).sum() / max(w.sum(), 1e-9))[axis])
        offset.append(sign * (at[0] - at[1]))
        truth.append(sign * (shapes.centroid(objects[0])[axis] - shapes.centroid(objects[1])[axis]) / f)
    return {"offset": round(float(np.mean(offset)), 2), "data": round(float(np.mean(truth)), 2)}


def read_prompts(path):
    """One prompt per line: UTF-8 (a BOM, CRLF and blank lines at the end are fine)."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"prompts file {path!r} is a folder: give a text file, one prompt per line")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompts file {path!r} not found")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line} is not UTF-8 (byte 0x{raw[e.start]:02x}): "
                         f"save the file as UTF-8") from None
    lines = text.splitlines()
    while lines and not lines[-1].strip():                # the blank last line many editors leave
        lines.pop()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            raise ValueError(f"{path}:{i} is empty: one prompt per line, no blank lines "
                             f"(use --cfg 1 and a real prompt instead of an empty unconditional one)")
    return [line.strip() for line in lines]


def output_paths(out, prompts_file=None):
    """(grid PNG, its prompt list) for --out, the folder checked writable now, before sampling.
    The list is the grid's full name + .txt: X.txt next to --out X.png could be anything of the
    user's (notes, the --prompts-file itself), X.png.txt can only belong to X.png."""
    grid_mode = out.lower().endswith(".png")
    if grid_mode and os.path.isdir(out):
        raise IsADirectoryError(f"--out {out} is a folder: name a new .png file, or the folder without .png")
    if not grid_mode and os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"--out {out} is a file: give a .png name for one grid, or a folder")
    folder = os.path.dirname(os.path.abspath(out)) if grid_mode else out
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise OSError(f"--out {out}: cannot write to {folder} ({e.strerror or e}); pick another --out") from None
    grid = out if grid_mode else os.path.join(out, "grid.png")
    if prompts_file and os.path.exists(grid + ".txt") and os.path.samefile(grid + ".txt", prompts_file):
        raise FileExistsError(f"--out {out} writes its prompt list to {grid}.txt, which is the --prompts-file: "
                              f"pick another --out")
    return grid, grid + ".txt"


def check_args(a):
    """Refuse bad flag values before any model or encoder is loaded."""
    runs.check_device(a.device)
    checks = [
        (a.n is not None and a.n < 1, f"--n {a.n}: give at least 1 image per prompt"),
        (a.batch_size < 1, f"--batch-size {a.batch_size}: give at least 1"),
        (a.res is not None and a.res < 1, f"--res {a.res}: give a positive resolution (model cells)"),
        # cfg mixes v_uncond + w (v_cond - v_uncond): 0 is unconditional, 1 plain conditional;
        # w < 0 steers away from the prompt, and NaN/inf turn every image black
        (a.cfg is not None and not (math.isfinite(a.cfg) and a.cfg >= 0),
         f"--cfg {a.cfg}: the guidance scale must be a finite number >= 0 (0 = unconditional, 1 = no guidance)"),
        (not 0 <= a.seed < 1 << 63, f"--seed {a.seed}: seeds are integers in [0, 2^63)"),
        (a.sample_steps is not None and not re.fullmatch(r"\d+(,\d+)*", a.sample_steps),
         f"--sample-steps {a.sample_steps}: give Euler steps per window, e.g. 10,10,10 (or 10 for each)"),
    ]
    for bad, message in checks:
        if bad:
            raise ValueError(message)


def run_sampling_defaults(a, meta):
    """(cfg scale, transition): the flags, else the run's saved ones, checked like the flags."""
    saved = meta.get("sample", {})
    cfg_scale = a.cfg if a.cfg is not None else saved.get("cfg", 1.0)
    transition = a.transition or saved.get("transition", "renoise")
    if not (isinstance(cfg_scale, (int, float)) and math.isfinite(cfg_scale) and cfg_scale >= 0):
        raise ValueError(f"{a.ckpt}/config.json: sample.cfg is {cfg_scale!r}, not a guidance scale >= 0; pass --cfg")
    if transition not in ("renoise", "bridge"):
        raise ValueError(f"{a.ckpt}/config.json: sample.transition is {transition!r}; pass --transition")
    return cfg_scale, transition


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="a train.py run folder, or the released NAMI-2B's folder (or a diffusers FLUX one)")
    p.add_argument("--convert", metavar="DIR", help="write the release / diffusers folder DIR as a run folder "
                   "(safetensors + config.json) at --out, once, so later loads never unpickle")
    p.add_argument("--preset", help="with --random-weights: sample an untrained preset")
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--prompt", action="append", default=[])
    p.add_argument("--prompts-file")
    p.add_argument("--n", type=int, help="images per prompt (default 1; --eval: 4, as GenEval does, since with one "
                   "image each of the 21 single-object prompts moves 'single' by 0.048)")
    p.add_argument("--sample-steps", help="Euler steps per window, e.g. 10,10,10 (one number: each; default: the run's)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the run's)")
    p.add_argument("--negative-prompt", default="", help="the prompt guidance pushes away from (default: empty)")
    p.add_argument("--compile", action="store_true", help="torch.compile each stage (compile time reported apart)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--transition", choices=["renoise", "bridge"], default=None)
    p.add_argument("--variant", choices=["nami", "piecewise", "baseline"], default="nami")
    p.add_argument("--res", type=int, default=None, help="final resolution in model cells (default: the model's)")
    p.add_argument("--out", help="a .png grid, or a folder for one PNG per image + grid.png (default: RUN/sampled.png, "
                   "or samples.png with --random-weights); the prompts go to GRID.txt")
    p.add_argument("--stages", action="store_true", help="also write GRID.stages.png: each window's end point, "
                   "upsampled (coarse to fine), labelled with its size and noise range")
    p.add_argument("--eval", action="store_true", help="score the shapes-world evaluation prompts, print JSON")
    p.add_argument("--stage-check", action="store_true",
                   help="shapes world: single-object accuracy when sampling starts in window k from real "
                        "images noised to its start, for every k (which stage loses accuracy), print JSON")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: the model under autocast, "
                   "the text encoders and VAE stored in bf16 (mT5-XXL: 11 instead of 23 GB)")
    p.add_argument("--vae", help="override the VAE folder / hub id (latent presets)")
    p.add_argument("--text-encoder", help="override the text encoder folder / hub id")
    p.add_argument("--pooled-encoder", help="override the pooled-vector encoder")
    a = p.parse_args(argv)
    if a.convert and a.out is None:
        raise ValueError(f"--convert {a.convert}: name the run folder to write with --out RUN")
    if a.out is None:                                     # samples of a run go into its folder
        a.out = os.path.join(a.ckpt, "sampled.png") if a.ckpt else "samples.png"
    check_args(a)
    if a.convert:
        out = runs.convert(a.convert, a.out)
        print(f"wrote {out}: config.json + model.safetensors (sample it with --ckpt {out})")
        return out
    if not (a.ckpt or a.preset and a.random_weights):
        p.error("pass --ckpt RUN_DIR (or --preset P --random-weights)")
    if a.stage_check and a.variant != "nami":
        p.error("--stage-check walks NAMI's windows: drop --variant")
    prompts = None
    if not (a.eval or a.stage_check):
        prompts = list(a.prompt) + (read_prompts(a.prompts_file) if a.prompts_file else [])
        if not prompts:
            p.error("give at least one --prompt or a --prompts-file")
        if any(not q.strip() for q in prompts):
            p.error("a --prompt is empty")
        grid_path, list_path = output_paths(a.out, a.prompts_file)

    overrides = {k: v for k, v in (("vae", a.vae), ("text_encoder", a.text_encoder),
                                   ("pooled_encoder", a.pooled_encoder)) if v is not None}
    if a.ckpt:
        model, meta = runs.load(a.ckpt, a.device)
    else:
        cfg = nami.preset(a.preset, **overrides)
        # untrained weights check the whole path; so do stand-ins for encoders not on this machine
        overrides.update(data.stand_in_encoders(cfg, os.path.join(tempfile.gettempdir(), f"nami-stand-ins-{a.preset}")))
        model = nami.NAMI(dataclasses.replace(cfg, **overrides)).to(a.device).eval()
        meta = {"sample": {"cfg": nami.TRAIN[a.preset]["cfg"], "steps": nami.TRAIN[a.preset]["sample_steps"],
                           "transition": "bridge" if cfg.bridge == "scale-shift" else "renoise"}}
        nami_rand = torch.Generator().manual_seed(a.seed)   # untrained but non-zero exits
        for m in model.heads:
            torch.nn.init.normal_(m.linear.weight, std=0.02, generator=nami_rand)
    cfg = model.cfg
    for k, v in overrides.items():
        setattr(cfg, k, v)
    if a.compile:
        nami.compile_stages(model)
    steps = nami.parse_steps(a.sample_steps or meta.get("sample", {}).get("steps") or "10",
                             1 if a.variant == "baseline" else cfg.K)
    cfg_scale, transition = run_sampling_defaults(a, meta)
    if transition == "bridge" and cfg.bridge == "linear" and not meta.get("sample", {}).get("bridge_fitted"):
        print(f"note: this run's BridgeFlow was never fitted, and unfitted it equals renoise; fit it with "
              f"python train.py --resume {a.ckpt} --transition bridge", file=sys.stderr)
    if a.res is not None:
        try:
            cfg.check(a.res)
        except ValueError as e:
            raise ValueError(f"--res {a.res}: {e}") from None
    if (a.eval or a.stage_check) and (cfg.channels, cfg.resolution) != (3, 32):
        raise ValueError("--eval and --stage-check score the 32x32 shapes world: they need a pixel-space 32x32 model")
    # ids from the run's config.json load only from disk; the ones typed here may download
    local_only = {getattr(cfg, f): f"pass --{f.replace('_', '-')} {getattr(cfg, f)} to allow fetching it from the "
                                   f"hub, or --{f.replace('_', '-')} FOLDER for a local copy"
                  for f in ("text_encoder", "pooled_encoder", "vae")
                  if a.ckpt and getattr(cfg, f) and not getattr(a, f)}
    enc, vae = data.load_encoders(cfg, a.device, local_only=local_only,
                                  dtype=torch.bfloat16 if a.dtype == "bf16" else None)
    if a.stage_check:
        result = stage_check(model, enc, steps, cfg_scale, a.seed, transition=transition)
        result["first_guess"] = first_guess(model, enc, a.seed)
        print(json.dumps(result))
        return result
    a.n = a.n or (4 if a.eval else 1)
    if a.eval:
        prompts = [q for q in shapes.eval_prompts() for _ in range(a.n)]
        t0 = time.perf_counter()
        images, _ = runs.generate(model, enc, prompts, steps, cfg_scale, a.seed, transition, a.variant,
                                  a.batch_size, vae, a.dtype, negative=a.negative_prompt)
        dt = time.perf_counter() - t0
        result = shapes.evaluate(prompts, images)
        print(json.dumps({**{c: round(result[c], 4) for c in shapes.CATEGORIES}, "overall": round(result["overall"], 4),
                          "direction": result["direction"] and round(result["direction"], 4),
                          "n_direction": result["n"]["direction"],
                          "images_per_s": round(len(prompts) / dt, 2), "n_images": len(prompts), "steps": list(steps),
                          "cfg": cfg_scale, "transition": transition, "variant": a.variant}))
        return result

    limit = getattr(enc, "max_length", 77)
    for q in prompts:                                     # words <= tokens: these surely get cut
        if len(q.split()) > limit:
            print(f"note: the text encoder reads {limit} tokens; the prompt {q[:40]!r}... ({len(q.split())} words) "
                  f"is cut there")
    prompts = [q for q in prompts for _ in range(a.n)]
    images, ends = runs.generate(model, enc, prompts, steps, cfg_scale, a.seed, transition, a.variant,
                                 a.batch_size, vae, a.dtype, a.res, a.negative_prompt)
    written = []
    if not a.out.lower().endswith(".png"):                # folder mode: one PNG per image, then the grid
        for i, im in enumerate(images):
            data.save_png(im, os.path.join(a.out, f"{i:04d}.png"))
            written.append(os.path.join(a.out, f"{i:04d}.png"))
    if a.stages:
        factor = vae.factor if vae is not None else 1
        data.save_png(runs.stage_sheet(ends, prompts, cfg, factor, a.res, a.variant), grid_path[:-4] + ".stages.png")
        written.append(grid_path[:-4] + ".stages.png")
    data.save_png(runs.sample_sheet(images, prompts[:: a.n], a.n), grid_path)
    written.append(grid_path)
    rows = "\n".join(prompts[:: a.n]) + "\n"              # the grid's rows, top to bottom
    data.atomic(list_path, lambda tmp: open(tmp, "w", encoding="utf-8").write(rows))
    print(f"wrote {len(written)} file(s): {written[-1]} ({len(images)} images, steps {list(steps)}, "
          f"cfg {cfg_scale}, {transition})")
    return images


if __name__ == "__main__":
    runs.cli(main)
