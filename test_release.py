"""
Tests for running the released NAMI-2B through this code: its weights map onto the `2b`
preset key for key, a tiny random diffusers FluxTransformer2DModel saved like the release
computes exactly what diffusers computes (every stage), the release-mode sampler takes the
time inputs and step sizes of the released scheduler's formulas (written out here), its
BridgeFlow is scale * Up(x) + shift, and pickled code is refused. Nothing is downloaded.
Run: python -m pytest -q test_release.py
"""
import json
import math
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import nami
import runs
import train
from nami import Text

torch.set_num_threads(2)


def release_flux(**kw):
    from diffusers import FluxTransformer2DModel
    return FluxTransformer2DModel(**{"patch_size": 1, "in_channels": 64, "num_layers": 8, "num_single_layers": 14,
                                     "attention_head_dim": 128, "num_attention_heads": 16, "joint_attention_dim": 4096,
                                     "pooled_projection_dim": 1024, "guidance_embeds": False,
                                     "axes_dims_rope": (16, 56, 56), **kw})


def test_release_keys_and_shapes_map_onto_the_2b_preset():
    with torch.device("meta"):
        flux = release_flux()
    bridge = {"scale": torch.empty(2, device="meta"), "shift.0": torch.empty(1, 16, 64, 64, device="meta"),
              "shift.1": torch.empty(1, 16, 128, 128, device="meta")}
    cfg = nami.preset("2b")
    state = runs.flux_to_nami(flux.state_dict(), cfg, bridge)      # raises on any missing / extra / misshapen key
    with torch.device("meta"):
        ours = nami.NAMI(cfg).state_dict()
    assert set(state) == set(ours) and all(state[k].shape == v.shape for k, v in ours.items())
    n_flux = sum(p.numel() for p in flux.parameters())
    assert nami.count_params(cfg) == n_flux + 2 + 16 * 64 * 64 + 16 * 128 * 128 == 2_117_971_522
    # a wrong shape, a missing and an extra key are errors that name the key
    sd = flux.state_dict()
    with pytest.raises(KeyError, match="proj_out.bias"):
        runs.flux_to_nami({k: v for k, v in sd.items() if k != "proj_out.bias"}, cfg, bridge)
    with pytest.raises(KeyError, match="lora_A"):
        runs.flux_to_nami({**sd, "transformer_blocks.0.lora_A.weight": torch.empty(1, device="meta")}, cfg, bridge)
    with pytest.raises(ValueError, match="bridge.shift.0"):
        runs.flux_to_nami(sd, cfg, {**bridge, "shift.0": torch.empty(1, 16, 32, 32, device="meta")})


CUT = [1, 2, 3]                  # stage k stops the 3 single blocks at CUT[k-1]: 3 / 4 / 5 blocks


def tiny_flux(seed=0):
    """A tiny random FLUX transformer, every weight non-zero (zero-init layers would hide bugs)."""
    torch.manual_seed(seed)
    m = release_flux(in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=16, num_attention_heads=2,
                     joint_attention_dim=24, pooled_projection_dim=20, axes_dims_rope=(4, 6, 6)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory):
    """A folder laid out like the release: transformer/ (config + pickled state dict), bridge_flow.bin."""
    root = tmp_path_factory.mktemp("release")
    flux = tiny_flux()
    os.makedirs(root / "transformer")
    with open(root / "transformer" / "config.json", "w") as f:
        json.dump({**{k: v for k, v in flux.config.items() if not k.startswith("_")}, "stage_singleblock_index": CUT}, f)
    torch.save(flux.state_dict(), root / "transformer" / "pytorch_model_fsdp.bin")
    g = torch.Generator().manual_seed(1)
    torch.save({"scale": torch.tensor([0.9, 1.1]), "shift.0": 0.1 * torch.randn(1, 4, 8, 8, generator=g),
                "shift.1": 0.1 * torch.randn(1, 4, 16, 16, generator=g)}, root / "bridge_flow.bin")
    return str(root), flux


def flux_forward(flux, x, t, tokens, pooled, singles=None):
    """diffusers' FLUX on unpacked latents (B, C, H, W), as its pipeline packs them."""
    B, C, H, W = x.shape
    packed = x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, H * W // 4, C * 4)
    ids = torch.zeros(H // 2, W // 2, 3)
    ids[..., 1], ids[..., 2] = torch.arange(H // 2)[:, None], torch.arange(W // 2)[None, :]
    blocks = flux.single_transformer_blocks
    if singles is not None:                               # the release's stage cut
        flux.single_transformer_blocks = torch.nn.ModuleList(list(blocks)[:singles])
    try:
        out = flux(hidden_states=packed, encoder_hidden_states=tokens, pooled_projections=pooled, timestep=t,
                   img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(tokens.shape[1], 3), return_dict=False)[0]
    finally:
        flux.single_transformer_blocks = blocks
    return out.view(B, H // 2, W // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)


def test_loaded_release_computes_what_diffusers_computes_at_every_stage(release_dir):
    folder, flux = release_dir
    model, meta = runs.load(folder)
    cfg = model.cfg
    assert (cfg.K, cfg.stage_layers, cfg.double, cfg.resolution) == (3, (3, 1, 1), 2, 16)
    assert meta["sample"] == {"cfg": 3.0, "steps": "10,10,10", "transition": "bridge", "bridge_fitted": True}
    g = torch.Generator().manual_seed(2)
    tokens, pooled, t = torch.randn(2, 7, 24, generator=g), torch.randn(2, 20, generator=g), torch.tensor([0.9, 0.3])
    text = Text(tokens, None, pooled)
    with torch.no_grad():
        for k, size in zip((1, 2, 3), (4, 8, 16)):
            x = torch.randn(2, 4, size, size, generator=g)
            ours = model(x, t, text, stage=k)
            ref = flux_forward(flux, x, t, tokens, pooled, singles=CUT[k - 1])
            assert (ours - ref).abs().max() < 1e-5, k
        x = torch.randn(2, 4, 16, 16, generator=g)      # full depth = the unmodified diffusers model
        assert (model(x, t, text) - flux_forward(flux, x, t, tokens, pooled)).abs().max() < 1e-5


def test_a_plain_diffusers_flux_folder_loads_as_k1(tmp_path):
    flux = tiny_flux(seed=3)
    flux.save_pretrained(tmp_path / "transformer")
    model, meta = runs.load(str(tmp_path))
    assert model.cfg.K == 1 and model.cfg.timesteps == "sigma" and meta["preset"] == "flux"
    g = torch.Generator().manual_seed(4)
    x, tokens, pooled = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 24, generator=g), torch.randn(1, 20, generator=g)
    with torch.no_grad():
        assert (model(x, torch.tensor([0.5]), Text(tokens, None, pooled)) -
                flux_forward(flux, x, torch.tensor([0.5]), tokens, pooled)).abs().max() < 1e-5


def released_schedule(steps, stage_range=(0, 1 / 3, 2 / 3, 1), gamma=1 / 3, T=1000):
    """PyramidFlowMatchEulerDiscreteScheduler (shift 1) as the release builds it, transcribed:
    [(timesteps the model is fed x 1000, local sigmas of the Euler updates)] per stage."""
    sigmas = np.linspace(1, T, T, dtype=np.float32)[::-1].copy() / T          # 1.0, 0.999, ..., 0.001
    starts, ends, dist = [], [], []
    for i in range(len(stage_range) - 1):
        si, ei = int(stage_range[i] * T), int(stage_range[i + 1] * T)
        start, end = float(sigmas[si]), float(sigmas[ei]) if ei < T else 0.0
        if i:
            ori = 1 - start
            start = 1 - ori / (math.sqrt(1 + 1 / gamma) * (1 - ori) + ori)
        starts.append(start), ends.append(end), dist.append(start - end)
    out, timesteps = [], sigmas * T
    for i, n in enumerate(steps):
        r0 = sum(dist[:i]) / sum(dist)
        r1 = 1.0 if i == len(steps) - 1 else sum(dist[: i + 1]) / sum(dist)
        tmax, tmin = float(timesteps[int(r0 * T)]), float(timesteps[min(int(r1 * T), T - 1)])
        m = int(tmax - tmin) + 1
        stage_t = np.linspace(tmax, tmin, m)[:-1]
        stage_s = np.linspace(1, 0, m)[:-1]
        out.append((np.linspace(stage_t[0], stage_t[-1], n), np.append(np.linspace(stage_s[0], stage_s[-1], n), 0.0)))
    return out


class Recorder(torch.nn.Module):
    """Returns a constant velocity of 1 and records what it was fed: the state moves by exactly
    the sampler's step sizes."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg, self.calls = cfg, []
        self.dummy = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.bridge = nami.ScaleShiftBridge(cfg.channels, cfg.bounds(), [8, 16, 32])

    def conditioning(self, t, pooled, stage, depth):
        return [t]       # the sampler computes a window's conditioning ahead: here, the time

    def forward(self, x, t, text, stage, depth, cond=None):
        t = t if cond is None else cond[0]
        self.calls.append((stage, t[0].item(), x[0, 0, 0, 0].item()))
        return torch.ones_like(x)


@pytest.mark.parametrize("steps", [(10, 10, 10), (3, 7, 1), (1, 2, 25)])
def test_release_sampler_follows_the_released_scheduler(steps):
    cfg = nami.preset("2b", resolution=32)
    rec = Recorder(cfg)
    text = Text(torch.zeros(1, 2, 4096, dtype=torch.float64), None, torch.zeros(1, 1024, dtype=torch.float64))
    _, ends = nami.sample(rec, text, steps=steps, transition="bridge", generator=torch.Generator().manual_seed(0))
    for k, (times, local) in enumerate(released_schedule(steps), 1):
        calls = [c for c in rec.calls if c[0] == k]
        assert len(calls) == steps[k - 1]
        assert np.allclose([c[1] for c in calls], times / 1000, rtol=0, atol=1e-9)         # model time inputs
        states = [c[2] for c in calls] + [ends[k - 1][0, 0, 0, 0].item()]
        assert np.allclose(np.diff(states), np.diff(local), rtol=0, atol=1e-9)            # Euler step sizes
    # the released numbers, for the record: stage 1 is fed 1000 .. 745, stage 3 ends at 2
    if steps == (10, 10, 10):
        fed = [round(c[1] * 1000, 4) for c in rec.calls]
        assert fed[0] == 1000 and fed[9] == 745 and fed[10] == 744 and fed[19] == 387 and fed[20] == 386 and fed[29] == 2


def test_release_noise_and_bridge():
    # the first window's noise: full-resolution noise, bilinearly halved and doubled per halving
    cfg = nami.preset("2b", resolution=32)
    z = nami.start_noise(cfg, 2, 32, 8, torch.Generator().manual_seed(5))
    full = torch.randn(2, 16, 32, 32, generator=torch.Generator().manual_seed(5))
    half = lambda v: torch.nn.functional.interpolate(v, scale_factor=0.5, mode="bilinear") * 2
    assert torch.allclose(z, half(half(full)), atol=1e-6)
    # BridgeFlow as released: scale * Up(x) + shift, nearest x2, no noise
    br = nami.ScaleShiftBridge(16, cfg.bounds(), [8, 16, 32])
    with torch.no_grad():
        br.scale.copy_(torch.tensor([0.7, 1.3]))
        br.shift[1].copy_(torch.randn(1, 16, 32, 32))
    x = torch.randn(2, 16, 16, 16)
    up = x.repeat_interleave(2, -1).repeat_interleave(2, -2)
    assert torch.allclose(br(x, 3, torch.randn(2, 16, 32, 32)), 1.3 * up + br.shift[1], atol=1e-6)


def test_pickled_code_in_a_release_is_refused_not_run(tmp_path):
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    os.makedirs(tmp_path / "rel" / "transformer")
    with open(tmp_path / "rel" / "transformer" / "pytorch_model_fsdp.bin", "wb") as f:
        pickle.dump({"x_embedder.weight": Evil()}, f)
    with pytest.raises(ValueError, match="refused"):
        runs.load(str(tmp_path / "rel"))
    torch.save({"w": Evil()}, tmp_path / "rel" / "transformer" / "pytorch_model_fsdp.bin")
    with pytest.raises(ValueError, match="refused"):
        runs.load(str(tmp_path / "rel"))
    assert not marker.exists()


def test_convert_sample_finetune_sample(release_dir, tmp_path, tiny_encoder_dirs):
    """The round trip: convert once (safetensors), sample it, fine-tune 3 steps from it, sample again."""
    import sample
    import shutil
    folder, _ = release_dir
    rel = tmp_path / "rel"
    shutil.copytree(folder, rel)
    for name, path in tiny_encoder_dirs.items():
        shutil.copytree(path, rel / name)
    run = sample.main(["--convert", str(rel), "--out", str(tmp_path / "converted")])
    assert sorted(os.listdir(run)) == ["config.json", "model.safetensors"]
    out = tmp_path / "a.png"
    sample.main(["--ckpt", run, "--prompt", "a red car", "--sample-steps", "1", "--out", str(out)])
    assert Image.open(out).size[0] > 0
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    with open(imgs / "metadata.jsonl", "w") as f:
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(imgs / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": "a red car"}) + "\n")
    tuned = train.main(["--init-from", run, "--data", str(imgs), "--steps", "3", "--batch-size", "4", "--workers", "0",
                        "--out", str(tmp_path / "runs"), "--name", "ft", "--sample-steps", "1", "--dtype", "fp32"])
    before, _ = runs.load(run)
    after, meta = runs.load(tuned)
    assert meta["model"]["timesteps"] == "pyramid" and meta["args"]["init_from"] == run
    changed = [k for k, v in after.state_dict().items() if not torch.equal(v, before.state_dict()[k])]
    assert changed and not any(k.startswith("bridge.") for k in changed)      # the released bridge stays
    sample.main(["--ckpt", tuned, "--prompt", "a red car", "--sample-steps", "1", "--out", str(tmp_path / "b.png")])


@pytest.fixture(scope="module")
def tiny_encoder_dirs(tmp_path_factory):
    """mt5/ (a tiny random T5, 24 wide), mclip/clip_text_encoder + mclip/tokenizer (a tiny BERT,
    20 wide) and vae/ (an AutoencoderKL with 4 latent channels, 2x): the release's layout."""
    from diffusers import AutoencoderKL
    from transformers import BertConfig, BertModel, BertTokenizer, T5Config, T5EncoderModel
    root = tmp_path_factory.mktemp("encoders")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "car"]) + "\n")
    torch.manual_seed(0)
    T5EncoderModel(T5Config(vocab_size=16, d_model=24, d_kv=8, d_ff=32, num_layers=1, num_heads=3)).save_pretrained(root / "mt5")
    BertTokenizer(str(vocab)).save_pretrained(root / "mt5")
    BertModel(BertConfig(vocab_size=16, hidden_size=20, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=16)).save_pretrained(root / "mclip" / "clip_text_encoder")
    BertTokenizer(str(vocab)).save_pretrained(root / "mclip" / "tokenizer")
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(4, 4), latent_channels=4,
                  norm_num_groups=2, layers_per_block=1).save_pretrained(root / "vae")
    return {"mt5": str(root / "mt5"), "mclip": str(root / "mclip"), "vae": str(root / "vae")}


def test_the_prepared_gpu_check_runs(tmp_path):
    # bench.py --gpu-check is what a lent GPU runs first; its smoke version runs the very same
    # code on a miniature model on the CPU, so the GPU's minutes are not lost to a crash
    import bench
    out = tmp_path / "gpu.json"
    report = bench.main(["--gpu-check-smoke", "--gpu-check-out", str(out)])
    assert json.load(open(out)) == json.loads(json.dumps(report))
    assert [r["px"] for r in report["sampling"]] == [64, 128] and report["fsdp_step"]["seconds"] > 0
    assert report["train_0.6b"]["img_per_s"] > 0 and 0 < report["sampling"][1]["flop_reduction"] < 1
