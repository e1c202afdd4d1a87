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
from dataclasses import asdict, fields

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import data
import nami


def config_from_json(d):
    """Config from its saved dict (JSON turns tuples into lists)."""
    if "timesteps" not in d:
        raise ValueError("this run was saved by an older version of this code (before the release-compatible "
                         "model of 2026-12-01: fixed-length text, SiLU conditioning), which computes a different "
                         "function; retrain it, or sample it with `git checkout 14e2e71`")
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
# Generating images from a loaded run.


def to_images(x, vae, size):
    """Model output (B,C,h,w) -> uint8 (B,size,size,3): VAE decode if latent, then nearest
    upsampling to `size` so every stage's end point can sit in one grid."""
    img = vae.decode(x.float()) if vae is not None else x.float()
    img = nami.up(img, size // img.shape[-1])
    return data.to_uint8(img)


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
    for i in range(0, len(prompts), batch_size):
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
            "sample": sampling}
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
