"""
Benchmark NAMI's sampling speed-up against the uniform baseline, side by side, on the SAME
random weights (the paper's Figure 2 and its Figure 10 component breakdown):

  baseline   one window, full depth, full resolution for every step ("FLUX-base")
  piecewise  K windows at increasing resolution, full depth at every stage
  nami       K windows with the nested layer split (the full method)

Per resolution: per-image latency (batch 1, 30 steps in total, classifier-free guidance as
in deployment, text encoder and VAE excluded as in the paper; warm-up, then the median of
repeats) and FLOPs counted by torch's FLOP counter on the meta device for the very same
sampler call. Prints a table and one JSON line per resolution.

  python bench.py --preset cifar                              # 2 CPU cores, a few minutes
  python bench.py --preset 0.6b --res 128 256 --steps 6       # CPU: small resolutions, fewer steps
  python bench.py --preset 2b --res 256 512 1024 2048 --device cuda --dtype bf16
  python bench.py --preset 2b --res 1024 --flops-only         # FLOPs anywhere, no compute

The quality side, at toy scale (the paper's Figures 7-9 and its BridgeFlow ablation): train
`tiny` models on the shapes world with EQUAL wall-clock budgets and score each with the
shapes-world evaluation (sample.py --eval, 30 sampling steps in total):

  python bench.py --ablate main --minutes 10           # baseline, piecewise only, NAMI (+ BridgeFlow)
  python bench.py --ablate main layers --minutes 10    # + layer splits 1:1:4, 4:1:1 (NAMI is 2:2:2)
  python bench.py --ablate windows --minutes 10        # window ratios 1:1:1, 1:1:2 (tiny's own is 2:1:1)
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

import nami
import shapes

VARIANTS = ("baseline", "piecewise", "nami")


def random_text(cfg, batch, device, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return nami.Text(torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g).to(device, dtype), None,
                     torch.randn(batch, cfg.pooled_dim, generator=g).to(device, dtype))


def steps_for(variant, cfg, total):
    """`total` Euler steps split evenly over the windows (30 = 10/10/10 for K = 3)."""
    if variant == "baseline":
        return (total,)
    base, extra = divmod(total, cfg.K)
    return tuple(base + (k < extra) for k in range(cfg.K))


def counted_flops(cfg, variant, res, total_steps, cfg_scale):
    """FLOPs of one sampler call, counted by torch on the meta device (no memory, no time)."""
    with torch.device("meta"):
        model = nami.NAMI(cfg)
    text, unc = random_text(cfg, 1, "meta", torch.float32, 0), random_text(cfg, 1, "meta", torch.float32, 1)
    with FlopCounterMode(display=False) as counter:
        nami.sample(model, text, unc, steps_for(variant, cfg, total_steps), cfg_scale, variant=variant,
                    resolution=res)
    return counter.get_total_flops()


def latency(model, variant, res, total_steps, cfg_scale, repeats, warmup, device, dtype):
    text = random_text(model.cfg, 1, device, dtype, 0)
    unc = random_text(model.cfg, 1, device, dtype, 1)
    steps = steps_for(variant, model.cfg, total_steps)

    def once():
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        nami.sample(model, text, unc, steps, cfg_scale, variant=variant, resolution=res,
                    generator=torch.Generator(device).manual_seed(0))
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for _ in range(warmup):
        once()
    return statistics.median(once() for _ in range(repeats))


# Ablations: (name, train.py flags, sample.py flags). "nami+bridge" evaluates the NAMI run
# again with BridgeFlow fitted on its own end points (train.py --transition bridge does the fit).
ABLATIONS = {
    "main": [("baseline", ["--baseline"], ["--steps", "30"]),
             ("piecewise", ["--no-nested"], []),
             ("nami", ["--transition", "bridge"], ["--transition", "renoise"]),
             ("nami+bridge", None, ["--transition", "bridge"])],
    # tiny's own split 2:2:2 and windows 2:1:1 are the "nami" row of main
    "layers": [(f"layers {s}", ["--set", f"stage_layers={s}"], []) for s in ("1:1:4", "4:1:1")],
    "windows": [(f"windows {w}", ["--set", f"windows={w}"], []) for w in ("1:1:1", "1:1:2")],
}


def ablate(kinds, minutes, out, seed, jobs, n_eval):
    """Train every variant of `kinds` for `minutes` of wall clock (same seed, same data stream),
    `jobs` at a time with the CPU cores split evenly between them, so that every variant gets
    the same compute; then score each with `sample.py --eval` (`n_eval` images per prompt) and
    print a table row and a JSON line each."""
    cores = os.cpu_count() or 1
    if not 1 <= jobs <= cores:
        raise ValueError(f"--jobs {jobs}: give each variant at least one of the {cores} cores")
    env = {**os.environ, "OMP_NUM_THREADS": str(cores // jobs)}
    here, runs, queue, variants = os.path.dirname(os.path.abspath(__file__)), {}, [], []
    os.makedirs(out, exist_ok=True)
    for kind in kinds:
        for name, train_flags, eval_flags in ABLATIONS[kind]:
            if train_flags is not None:
                run = f"{kind}-{name.replace(' ', '_')}"
                queue.append((run, [sys.executable, os.path.join(here, "train.py"), "--minutes", str(minutes),
                                    "--out", out, "--name", run, "--seed", str(seed), *train_flags]))
            runs[name] = os.path.join(out, run)
            variants.append((kind, name, eval_flags))
    for i in range(0, len(queue), jobs):
        procs = [(run, subprocess.Popen(cmd, env=env, stdout=open(os.path.join(out, run + ".log"), "w"),
                                        stderr=subprocess.STDOUT)) for run, cmd in queue[i: i + jobs]]
        print(f"training {', '.join(run for run, _ in procs)} ({minutes} min, "
              f"{env['OMP_NUM_THREADS']} thread(s) each)", flush=True)
        for run, proc in procs:
            if proc.wait():
                raise RuntimeError(f"training {run} failed: see {os.path.join(out, run + '.log')}")
    rows = []
    for kind, name, eval_flags in variants:
        log = [json.loads(line) for line in open(os.path.join(runs[name], "log.jsonl"))] or [{}]
        steps = json.load(open(os.path.join(runs[name], "config.json")))["step"]
        res = subprocess.run([sys.executable, os.path.join(here, "sample.py"), "--ckpt", runs[name], "--eval",
                              "--n", str(n_eval), "--steps", "10", *eval_flags],
                             capture_output=True, text=True, check=True)
        result = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append({"ablation": kind, "variant": name, "minutes": minutes, "steps": steps,
                     "train_img_per_s": log[-1].get("img_per_s"), "sample_img_per_s": result["images_per_s"],
                     **{c: result[c] for c in (*shapes.CATEGORIES, "overall")}})
    cats = (*shapes.CATEGORIES, "overall")
    print(f"\n{'variant':>14} {'steps':>6} {'train img/s':>11} {'sample img/s':>12} " + " ".join(f"{c[:8]:>8}" for c in cats))
    for r in rows:
        print(f"{r['variant']:>14} {r['steps']:>6} {str(r['train_img_per_s']):>11} {r['sample_img_per_s']:>12} "
              + " ".join(f"{r[c]:8.3f}" for c in cats))
    for r in rows:
        print(json.dumps(r))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cifar", choices=list(nami.PRESETS))
    p.add_argument("--res", type=int, nargs="+", help="image sizes in pixels (default: the preset's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (compiles during warm-up)")
    p.add_argument("--steps", type=int, default=30, help="Euler steps in total (split evenly over the windows)")
    p.add_argument("--cfg", type=float, help="guidance scale (default: the preset's; 1 = no CFG)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--flops-only", action="store_true", help="count FLOPs on the meta device, skip timing")
    p.add_argument("--ablate", nargs="+", choices=list(ABLATIONS), help="train and score tiny variants instead (see above)")
    p.add_argument("--minutes", type=float, default=10, help="with --ablate: wall-clock budget per variant")
    p.add_argument("--jobs", type=int, default=2, help="with --ablate: variants trained at once, cores split evenly")
    p.add_argument("--n-eval", type=int, default=3, help="with --ablate: evaluation images per prompt")
    p.add_argument("--out", default="out/ablate")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.ablate:
        return ablate(a.ablate, a.minutes, a.out, a.seed, a.jobs, a.n_eval)

    cfg = nami.preset(a.preset)
    cfg_scale = a.cfg if a.cfg is not None else nami.TRAIN[a.preset]["cfg"]
    factor = 8 if cfg.vae else 1                          # FLUX/SD3 VAEs: 8x fewer cells per side
    sizes = a.res or [cfg.resolution * factor]
    device, dtype = torch.device(a.device), torch.bfloat16 if a.dtype == "bf16" else torch.float32
    model = None
    if not a.flops_only:
        torch.manual_seed(0)
        model = nami.NAMI(cfg)
        for h in model.heads:                             # zero-init exits would make every image 0
            torch.nn.init.normal_(h.linear.weight, std=0.02)
        model = model.to(device, dtype).eval()
        if a.compile:
            model.forward = torch.compile(model.forward)
    print(f"{a.preset}: {nami.count_params(cfg) / 1e6:.1f}M params, layers {cfg.stage_layers}, device {a.device}, "
          f"{a.dtype}, {a.steps} steps, cfg {cfg_scale}, batch 1")
    print(f"{'res':>6} {'variant':>10} {'TFLOP':>9} {'latency s':>10} {'FLOP red.':>10} {'latency red.':>12}")
    rows = []
    for px in sizes:
        if px % factor:
            raise ValueError(f"--res {px} must be divisible by the VAE factor {factor}")
        res = px // factor
        cfg.check(res)
        flops = {v: counted_flops(cfg, v, res, a.steps, cfg_scale) for v in VARIANTS}
        lat = {v: None for v in VARIANTS}
        if model is not None:
            with torch.no_grad():
                lat = {v: latency(model, v, res, a.steps, cfg_scale, a.repeats, a.warmup, device, dtype)
                       for v in VARIANTS}
        row = {"preset": a.preset, "res": px, "device": a.device, "dtype": a.dtype, "steps": a.steps,
               "cfg": cfg_scale, "flops": flops, "latency_s": lat}
        for v in ("piecewise", "nami"):
            key = "" if v == "nami" else "piecewise_"
            row[f"{key}flop_reduction"] = round(1 - flops[v] / flops["baseline"], 4)
            row[f"{key}latency_reduction"] = None if lat[v] is None else round(1 - lat[v] / lat["baseline"], 4)
        for v in VARIANTS:
            red = "" if v == "baseline" else f"{1 - flops[v] / flops['baseline']:10.1%}"
            lred = "" if v == "baseline" or lat[v] is None else f"{1 - lat[v] / lat['baseline']:12.1%}"
            ls = "-" if lat[v] is None else f"{lat[v]:10.3f}"
            print(f"{px:>6} {v:>10} {flops[v] / 1e12:9.3f} {ls:>10} {red:>10} {lred:>12}")
        rows.append(row)
    for row in rows:
        print(json.dumps(row))
    return rows


if __name__ == "__main__":
    main()
