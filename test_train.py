"""
End-to-end tests of train.py and sample.py on a miniature model (width 32): bit-exact
resume, Ctrl-C and SIGTERM, atomic and pickle-free checkpoints saved as one unit, the files a
run writes, run folders never overwritten or shared, NaN never saved, no network for a run
folder's encoder ids, WebDataset training, clear errors for bad input before anything loads.
Run: python -m pytest -q test_train.py
"""
import errno
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch
from PIL import Image

import data
import nami
import runs
import sample
import shapes
import train

HERE = os.path.dirname(os.path.abspath(__file__))
MINI = ["--set", "width=32", "--set", "heads=2", "--batch-size", "8", "--dtype", "fp32", "--workers", "0", "--no-compile",
        "--log-every", "1", "--sample-steps", "1,1,1", "--warmup", "2"]


def state(run):
    return runs.load_checkpoint(run)


def copy_run(run, tmp_path, name="copy"):
    shutil.copytree(run, tmp_path / name)
    return str(tmp_path / name)


def digest(run):
    """{relative path: sha256} of every file under a run folder."""
    return {os.path.relpath(os.path.join(d, f), run): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, names in os.walk(run) for f in names}


def edit_config(run, **model):
    meta = json.load(open(os.path.join(run, "config.json")))
    meta["model"].update(model)
    open(os.path.join(run, "config.json"), "w").write(json.dumps(meta))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One run of 6 steps straight, and one stopped at step 3 then resumed to 6."""
    out = str(tmp_path_factory.mktemp("runs"))
    straight = train.main(MINI + ["--out", out, "--name", "straight", "--steps", "6"])
    halves = train.main(MINI + ["--out", out, "--name", "halves", "--steps", "6", "--stop-at", "3"])
    stopped = state(halves)
    train.main(["--resume", halves])
    return straight, halves, stopped


def test_resume_continues_bit_for_bit(trained):
    straight, halves, stopped = trained
    assert int(stopped["step"]) == 3
    a, b = state(straight), state(halves)
    assert int(a["step"]) == int(b["step"]) == 6
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume"
    sa, sb = a["optim"]["state"], b["optim"]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    assert torch.equal(a["loss_ema"], b["loss_ema"])
    # and training did something: the stopped run's weights differ from the finished ones
    assert not all(torch.equal(stopped["model"][k], a["model"][k]) for k in a["model"])


def test_run_folder_contents(trained):
    straight = trained[0]
    for f in ("config.json", "step_0000006/model.safetensors", "step_0000006/state.pt", "log.jsonl", "samples.png",
              "stages.png", "samples.txt"):
        assert os.path.isfile(os.path.join(straight, f)), f
    assert sorted(os.listdir(straight)) == ["config.json", "log.jsonl", "loss.png", "samples.png", "samples.txt", "stages.png",
                                            "stages.txt", "step_0000006"]    # no lock, no .tmp left behind
    meta = json.load(open(os.path.join(straight, "config.json")))
    assert meta["checkpoint"] == "step_0000006"
    assert meta["preset"] == "tiny" and meta["data"] == "shapes:forms=1:2:2:2" and meta["text_encoder"] == "all-MiniLM-L6-v2"
    assert meta["model"]["stage_layers"] == [2, 2, 2] and meta["step"] == 6
    log = [json.loads(line) for line in open(os.path.join(straight, "log.jsonl"))]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6] and all(len(r["stage_loss"]) == 3 for r in log)
    # model.safetensors holds the EMA weights, which sample.load restores exactly
    model, _ = runs.load_run(straight)
    ema = state(straight)["ema"]
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())
    grid = np.asarray(Image.open(os.path.join(straight, "stages.png")))
    assert grid.shape[0] > grid.shape[1]                # 8 prompts down, 3 windows across


def test_checkpoints_refuse_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned > " + str(tmp_path / "owned"),))
    run = tmp_path / "run"
    run.mkdir()
    with open(run / "state.pt", "wb") as f:
        pickle.dump({"step": Evil()}, f)
    with pytest.raises(pickle.UnpicklingError):
        runs.load_checkpoint(str(run))
    assert not (tmp_path / "owned").exists()


def test_atomic_write_keeps_the_previous_file(tmp_path):
    path = str(tmp_path / "model.safetensors")
    data.atomic(path, lambda p: open(p, "w").write("old"))

    def crash(p):
        open(p, "w").write("half")
        raise OSError("disk full")
    with pytest.raises(OSError):
        data.atomic(path, crash)
    assert open(path).read() == "old" and os.listdir(tmp_path) == ["model.safetensors"]   # no .tmp left


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])     # Ctrl-C; schedulers, docker stop
def test_ctrl_c_and_sigterm_save_a_checkpoint_and_say_how_to_resume(tmp_path, sig):
    cmd = [sys.executable, "train.py", *MINI, "--out", str(tmp_path), "--name", "c", "--steps", "100000"]
    quiet = sig == signal.SIGTERM                     # and tqdm's TQDM_DISABLE=1 silences the bar
    proc = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1"} if quiet else None)
    log = tmp_path / "c" / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= 2):
        time.sleep(0.5)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert f"stopped by {sig.name}" in out and "train.py --resume" in out
    assert ("/100000 [" in out) != quiet
    step = int(state(str(tmp_path / "c"))["step"])
    assert step >= 2 and json.load(open(tmp_path / "c" / "config.json"))["step"] == step


def test_sample_cli_writes_one_png_per_prompt_and_a_grid(trained, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\ntwo blue squares\na green triangle above a white circle\n")
    out = tmp_path / "imgs"
    sample.main(["--ckpt", trained[0], "--prompts-file", str(prompts), "--out", str(out), "--sample-steps", "1,1,1", "--stages"])
    names = sorted(os.listdir(out))
    assert names == ["0000.png", "0001.png", "0002.png", "grid.png", "grid.png.txt", "grid.stages.png"]
    # the stage sheet: one row per image, one column per window (128 px cells + gaps), labels around
    sheet = np.asarray(Image.open(out / "grid.stages.png"))
    assert sheet.shape[0] >= 3 * 128 and sheet.shape[1] >= 3 * 128 and (sheet[:12] < 128).any()
    assert Image.open(out / "0000.png").size == (32, 32)
    assert (out / "grid.png.txt").read_text().splitlines() == prompts.read_text().splitlines()
    # --out X.png never touches an X.txt of the user's (here: the prompts file itself)
    sample.main(["--ckpt", trained[0], "--prompts-file", str(prompts), "--out", str(tmp_path / "p.png"), "--sample-steps", "1"])
    assert prompts.read_text().splitlines()[0] == "a red circle" and len(prompts.read_text().splitlines()) == 3
    assert (tmp_path / "p.png.txt").read_text() == prompts.read_text()
    with pytest.raises(FileExistsError, match="is the --prompts-file"):   # ... nor the list it would write
        sample.main(["--ckpt", trained[0], "--prompts-file", str(tmp_path / "p.png.txt"), "--out", str(tmp_path / "p.png")])


class NoText:
    """A text encoder stand-in for oracles, which ignore the text."""
    def encode(self, captions):
        n = len(captions)
        return torch.zeros(n, 2, 384), torch.ones(n, 2, dtype=torch.bool), torch.zeros(n, 384)


def test_stage_check_with_an_oracle_gets_everything_right(trained, capsys):
    # An oracle that knows the very renders stage_check draws (same seed) must score 1 from
    # every window's start: captions, renders, start states and windows all line up.
    from test_nami import Oracle

    cfg, n = nami.preset("tiny"), 30
    rng = np.random.default_rng(0)
    renders = [shapes.render(o) for _, o in (shapes.sample_scene(rng, form) for form in ("single", "position")
                                             for _ in range(n))]
    oracle = Oracle(cfg, data.to_tensor(np.stack(renders)), nami.window_bounds(cfg.windows))
    result = sample.stage_check(oracle, NoText(), (2, 2, 2), seed=0, n=n)
    assert result == {f"from_window_{k}": {"circle": 1.0, "square": 1.0, "triangle": 1.0, "all": 1.0, "position": 1.0,
                                           "direction": 1.0} for k in (1, 2, 3)}
    # and the command line, on a trained (miniature) run
    result = sample.main(["--ckpt", trained[0], "--stage-check", "--sample-steps", "1,1,1"])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line == result and len(line) == 4 and set(line.pop("first_guess")) == {"offset", "data"}
    assert all(0 <= v["all"] <= 1 for v in line.values())


@pytest.mark.parametrize("mirror", [False, True])
def test_first_guess_reads_the_layout_an_oracle_asks_for(mirror):
    # An oracle whose window-1 field flows to the scene's own render has exactly the render
    # (at 8 px) as its first guess: the offset must match the scenes' geometric centroids.
    # Mirrored along each relation's axis, the same renders ask for the opposite order.
    from test_nami import Oracle

    cfg, n, draws = nami.preset("tiny"), 24, 2
    scenes = sample.first_guess_scenes(seed=3, n=n)
    renders = []
    for caption, objects in scenes:
        image = shapes.render(objects)
        if mirror:
            horizontal = shapes.parse_caption(caption)["relation"] in ("to the left of", "to the right of")
            image = image[:, ::-1] if horizontal else image[::-1]
        renders.append(image)
    x_star = data.to_tensor(np.stack(renders)).repeat_interleave(draws, 0)
    truth = np.mean([(1 if r in ("to the right of", "below") else -1) * (shapes.centroid(o[0])[ax] - shapes.centroid(o[1])[ax]) / 4
                     for c, o in scenes for r in [shapes.parse_caption(c)["relation"]]
                     for ax in [0 if r in ("to the left of", "to the right of") else 1]])
    got = sample.first_guess(Oracle(cfg, x_star, nami.window_bounds(cfg.windows)), NoText(), seed=3, n=n, draws=draws)
    assert got["data"] == pytest.approx(truth, abs=0.01) and 3 < truth < 5
    assert got["offset"] == pytest.approx(-truth if mirror else truth, abs=0.3)


def test_sample_eval_prints_scores(trained, capsys):
    result = sample.main(["--ckpt", trained[0], "--eval", "--sample-steps", "1,1,1", "--batch-size", "128"])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("single", "counting", "two_objects", "position", "attribution", "overall", "images_per_s"):
        assert key in line
    assert 0 <= line["overall"] <= 1 and line["n_images"] == 4 * len(sample.shapes.eval_prompts())
    assert line["overall"] == pytest.approx(result["overall"], abs=1e-4)
    with pytest.raises(ValueError, match="at least 1 image per prompt"):   # --n 0: an error, not the default
        sample.main(["--ckpt", trained[0], "--eval", "--n", "0"])


def test_bad_inputs_get_clear_errors(tmp_path, trained):
    with pytest.raises(FileNotFoundError, match="train.py"):
        sample.main(["--ckpt", str(tmp_path / "nope"), "--prompt", "a red circle"])
    blank = tmp_path / "blank.txt"
    blank.write_text("a red circle\n\ntwo blue squares\n")
    with pytest.raises(ValueError, match=r"blank.txt:2 is empty"):
        sample.main(["--ckpt", trained[0], "--prompts-file", str(blank)])
    with pytest.raises(ValueError, match="divisible by patch"):
        train.main(MINI + ["--out", str(tmp_path), "--set", "resolution=36", "--steps", "1"])
    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        train.main(MINI + ["--out", str(tmp_path), "--data", str(tmp_path), "--steps", "1"])
    with pytest.raises(FileNotFoundError, match="state.pt"):
        train.main(["--resume", trained[0] + "_missing"])
    with pytest.raises(ValueError, match="no Config field"):
        train.main(MINI + ["--set", "depthh=3"])


def test_image_folder_with_a_corrupt_image_trains(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"picture {i}"})
    (folder / "3.png").write_bytes(b"\x89PNG not really")         # corrupt
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    run = train.main(MINI + ["--out", str(tmp_path), "--name", "folder", "--data", str(folder), "--steps", "3"])
    assert int(state(run)["step"]) == 3
    assert re.search(r"skipped [12] unusable", capsys.readouterr().out)  # index 3 is drawn at steps 0 and 1


def test_dry_run_reports_2b(capsys):
    train.main(["--preset", "2b", "--dry-run", "--batch-size", "8", "--ranks", "8", "--fsdp", "--checkpointing"])
    out = capsys.readouterr().out
    assert "params: 2.12B" in out and out.count("per training image") == 3 and "memory per GPU" in out
    assert "-59.6%" in out and "GPU-hours" in out
    # the whole schedule: 250k steps x 8 images at the paper's phases, 3x forward FLOPs per image
    train.main(["--dry-run"])                                 # tiny: small numbers in small units
    assert "0.0 GFLOP" not in capsys.readouterr().out


def test_default_precision_is_bf16_where_the_hardware_has_it(monkeypatch):
    # bf16 autocast on GPUs and on CPUs with bf16 dot products (AVX512-BF16 or AMX); fp32 on
    # CPUs that would emulate it, and train.py takes that default unless --dtype says otherwise
    assert runs.train_dtype("cuda") == runs.train_dtype("cuda:1") == "bf16" and runs.train_dtype("mps") == "fp32"
    for avx512_bf16, amx, want in ((False, False, "fp32"), (True, False, "bf16"), (False, True, "bf16")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        settled = lambda *flags: train.settle_args(*train.parse_args(["--device", "cpu", *flags]))[0].dtype
        assert runs.train_dtype("cpu") == settled() == want and settled("--dtype", "fp32") == "fp32"


def test_learning_rate_and_phase_schedule(trained, tmp_path):
    # warmup: linear from base/warmup; the paper's recipe: x1 until 80% of the run, then x0.5
    lr = lambda step, p, phases="paper": train.learning_rate(1e-3, step, p, 100, phases)
    assert lr(0, 0.0) == pytest.approx(1e-5) and lr(49, 0.1) == pytest.approx(5e-4)
    assert lr(500, 0.5) == pytest.approx(1e-3) and lr(500, 0.79) == pytest.approx(1e-3)
    assert lr(500, 0.85) == pytest.approx(5e-4) and lr(99, 0.9) == pytest.approx(5e-4)
    # tiny's: x1 until 70%, then linear to 0 at the end: 1e-3 * (1 - p) / 0.3
    assert lr(0, 0.0, "tiny") == pytest.approx(1e-5) and lr(500, 0.69, "tiny") == pytest.approx(1e-3)
    for p in (0.7, 0.8, 0.9, 0.99, 1.0):
        assert lr(500, p, "tiny") == pytest.approx(1e-3 * (1 - p) / 0.3)
    # the paper's resolution ratios: 120k steps at 4:2:1, 80k at 2:4:1, 50k at 1:2:4 (250k)
    ratios = lambda p, phases: train.phase(p, 3, phases)[0]
    assert [ratios(s / 250, "paper") for s in (0, 119.9, 120, 199.9, 200, 249.9)] == \
        [(4, 2, 1)] * 2 + [(2, 4, 1)] * 2 + [(1, 2, 4)] * 2
    assert {ratios(p / 100, "tiny") for p in range(100)} == {(4, 8, 1)}
    # a tiny run uses tiny's phases after its head start (0.2222 of 6 steps: 1), and a resumed
    # run keeps the phases it started with
    log = [json.loads(line) for line in open(os.path.join(trained[0], "log.jsonl"))]
    assert [r["ratios"] for r in log] == [[1, 0, 0]] + [[4, 8, 1]] * 5
    assert train.settle_args(*train.parse_args(["--resume", trained[1], "--steps", "9"]))[0].phases == "tiny"
    # AdamW's beta2 is the preset's (tiny: 0.95), reaches the optimizer, and survives a resume
    assert [g["betas"] for g in state(trained[1])["optim"]["param_groups"]] == [(0.9, 0.95)]
    meta = json.load(open(os.path.join(trained[1], "config.json")))   # a run saved before --phases and
    del meta["args"]["phases"], meta["args"]["beta2"]               # --beta2: the paper's phases, 0.99
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text(json.dumps(meta))
    resumed = train.settle_args(*train.parse_args(["--resume", str(old)]))[0]
    assert (resumed.phases, resumed.beta2) == ("paper", 0.99)
    assert train.settle_args(*train.parse_args(["--phases", "paper"]))[0].phases == "paper"
    cifar = train.settle_args(*train.parse_args(["--preset", "cifar"]))[0]
    assert (cifar.phases, cifar.beta2) == ("paper", 0.99)


def test_head_start_trains_stage_1_alone_on_its_own_data_then_the_phases(tmp_path, monkeypatch, capsys):
    # --head-start 0.5 of 10 steps: steps 1-5 train stage 1 alone (ratios 1:0:0) on the head
    # start's position captions, steps 6-10 the phases on --data over the rest of the run: their
    # warmup starts again, and tiny's lr decay over the last 30% of the phases covers step 10
    # (every head-start sample at its window's start, then --start-share of them)
    forms, make, shares, loss = [], shapes.make_batch, [], nami.nami_loss
    monkeypatch.setattr(shapes, "make_batch", lambda n, seed, index=0, **kw: (forms.append(kw.get("forms")),
                                                                               make(n, seed, index, **kw))[1])
    monkeypatch.setattr(nami, "nami_loss", lambda *args: (shares.append(args[-1]), loss(*args))[1])
    run = train.main(MINI + ["--out", str(tmp_path), "--name", "h", "--steps", "10", "--head-start", "0.5",
                             "--head-start-data", "shapes:forms=0:0:0:1", "--start-share", "0.25"])
    log = [json.loads(line) for line in open(os.path.join(run, "log.jsonl"))]
    assert [r["ratios"] for r in log] == [[1, 0, 0]] * 5 + [[4, 8, 1]] * 5
    assert [r["stage_loss"][1] for r in log[:5]] == [1.0] * 5 and log[5]["stage_loss"][1] != 1.0
    assert [r["lr"] for r in log] == pytest.approx([2.5e-3] + [5e-3] * 4 + [2.5e-3] + [5e-3] * 3 + [5e-3 * 0.2 / 0.3])
    assert forms[:5] == [(0, 0, 0, 1)] * 5 and forms[5:10] == [(1, 2, 2, 2)] * 5   # the preset's caption mix
    assert shares == [1.0] * 5 + [0.25] * 5
    # more steps on resume: the head start is then 10 of 20, so step 10 starts the phases' warmup
    capsys.readouterr()
    train.main(["--resume", run, "--steps", "20", "--stop-at", "11"])
    assert "at step 10 the lr is 2.50e-03 (it was 0.00e+00 of the 10-step schedule)" in capsys.readouterr().out
    # the preset's head start is on the shapes world's position captions, and only there
    settle = lambda *flags: train.settle_args(*train.parse_args(list(flags)))[0]
    assert (settle().head_start, settle().head_start_data) == (nami.TRAIN["tiny"]["head_start"], "shapes:forms=0:0:0:1")
    assert settle("--data", "cifar:/x").head_start_data is None
    assert settle().data == "shapes:forms=1:2:2:2" and settle("--preset", "cifar").data == "shapes"
    assert settle("--head-start", "0").head_start == 0 and settle("--preset", "cifar").head_start == 0
    assert settle().start_share == nami.TRAIN["tiny"]["start_share"] > 0 and settle("--preset", "cifar").start_share == 0
    with pytest.raises(ValueError, match="fraction of the run"):
        train.main(MINI + ["--out", str(tmp_path), "--steps", "3", "--head-start", "1"])
    with pytest.raises(ValueError, match="--start-share 1.5: give a fraction"):
        train.main(MINI + ["--out", str(tmp_path), "--steps", "3", "--start-share", "1.5"])


def test_head_start_skips_the_empty_stages_but_adamw_steps_them():
    # one process skips a stage the ratios give no samples (no graph to build, no empty
    # batches); train.py then gives its parameters zero gradients, so AdamW's moments and step
    # counts match those of N ranks, which run the empty stage. Without the zeros the stage-3
    # head's first real step would be bias-corrected as step 1 instead of step 2.
    torch.manual_seed(0)
    one = nami.NAMI(nami.preset("tiny", width=32, heads=2))
    ranks = nami.NAMI(nami.preset("tiny", width=32, heads=2))
    ranks.load_state_dict(one.state_dict())
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.9, 0.95), fused=True) for m in (one, ranks)]
    x, t = torch.randn(8, 3, 32, 32), nami.Text(torch.randn(8, 14, 384), None, torch.randn(8, 384))
    for ratios in ((1, 0, 0), (4, 8, 1)):
        g = lambda: torch.Generator().manual_seed(3)
        nami.nami_loss(one, x, t, ratios, generator=g())[0].backward()
        if ratios[2] == 0:
            assert one.heads[2].linear.weight.grad is None     # stage 3 skipped
        for r in (0, 1):                                  # two ranks' shards, averaged as DDP does
            (nami.nami_loss(ranks, x[r::2], t.select(slice(r, None, 2)), ratios, generator=g(), shard=(r, 2))[0] / 2).backward()
        assert ranks.heads[2].linear.weight.grad is not None   # the empty stage ran
        for m, opt in zip((one, ranks), opts):
            train.clip_gradients(m)
            opt.step()
            opt.zero_grad(set_to_none=True)
    for p, q in zip(one.parameters(), ranks.parameters()):
        a, b = opts[0].state[p], opts[1].state[q]
        assert a["step"] == b["step"] == 2
        assert torch.allclose(a["exp_avg"], b["exp_avg"], rtol=1e-4, atol=1e-9)
        assert torch.allclose(a["exp_avg_sq"], b["exp_avg_sq"], rtol=1e-3, atol=1e-12)


def test_baseline_and_piecewise_runs_finish(tmp_path):
    # the K = 1 baseline samples its end-of-run grid with the SUM of --sample-steps (one window)
    run = train.main(MINI + ["--out", str(tmp_path), "--name", "base", "--steps", "2", "--variant", "baseline"])
    meta = json.load(open(os.path.join(run, "config.json")))
    assert meta["model"]["stage_layers"] == [6] and os.path.isfile(os.path.join(run, "samples.png"))
    assert all(r["ratios"] == [1] for r in map(json.loads, open(os.path.join(run, "log.jsonl"))))
    assert nami.parse_steps("2,3,4", runs.load_run(run)[0].cfg.K) == (9,)
    run = train.main(MINI + ["--out", str(tmp_path), "--name", "pw", "--steps", "2", "--variant", "piecewise"])
    assert json.load(open(os.path.join(run, "config.json")))["model"]["nested"] is False
    with pytest.raises(ValueError, match="one count per window"):
        train.main(MINI + ["--out", str(tmp_path), "--steps", "2", "--sample-steps", "4,4"])


def test_bridge_run_fits_every_jump_on_the_models_end_points(tmp_path, capsys):
    run = train.main(MINI + ["--out", str(tmp_path), "--name", "br", "--steps", "2", "--transition", "bridge"])
    assert re.findall(r"BridgeFlow jump (\d)->(\d)", capsys.readouterr().out) == [("1", "2"), ("2", "3")]
    model, meta = runs.load_run(run)
    fresh = nami.BridgeFlow(3, nami.window_bounds(model.cfg.windows))   # initialised to renoise
    assert meta["sample"]["transition"] == "bridge"
    assert not torch.allclose(model.bridge.b, fresh.b)     # fitted, and saved with the EMA weights


def test_resume_a_time_budgeted_run_with_more_steps(tmp_path):
    # the tiny preset trains on a wall-clock budget; --resume RUN --steps N must go on to step N
    run = train.main(MINI + ["--out", str(tmp_path), "--name", "budget", "--minutes", "0.001"])
    done = int(state(run)["step"])
    train.main(["--resume", run, "--steps", str(done + 3)])
    assert int(state(run)["step"]) == done + 3


# -----------------------------------------------------------------------------
# Nothing lost: run folders, locks, NaN, saves as one unit


def test_a_run_folder_is_never_overwritten(trained, tmp_path):
    run = copy_run(trained[0], tmp_path, "straight")
    before = digest(run)
    with pytest.raises(FileExistsError, match=r"already holds a run \(step 6\).*--resume .*--overwrite"):
        train.main(MINI + ["--out", str(tmp_path), "--name", "straight", "--steps", "2"])
    assert digest(run) == before
    # --overwrite replaces it: a new checkpoint and a new log, not the old log plus new lines
    train.main(MINI + ["--out", str(tmp_path), "--name", "straight", "--steps", "2", "--overwrite"])
    assert int(state(run)["step"]) == 2 and sorted(f for f in os.listdir(run) if f.startswith("step_")) == ["step_0000002"]
    assert [json.loads(line)["step"] for line in open(os.path.join(run, "log.jsonl"))] == [1, 2]


def test_one_writer_per_run_folder_and_a_dead_writers_lock_does_not_block(trained, tmp_path):
    run = copy_run(trained[0], tmp_path)
    lock = runs.claim(run, resume=True)                   # another train.py holds the folder
    try:
        with pytest.raises(FileExistsError, match=rf"in use by another train.py \(pid {os.getpid()}"):
            train.main(["--resume", run, "--steps", "7"])
    finally:
        runs.release(lock)
    assert not os.path.exists(os.path.join(run, runs.LOCK))
    # the lock file of a killed run (its pid long gone; the kernel dropped its flock) is taken over
    open(os.path.join(run, runs.LOCK), "w").write("999999999\n")
    runs.release(runs.claim(run, resume=True))


def test_a_nan_step_never_reaches_disk(trained, tmp_path):
    run = copy_run(trained[0], tmp_path)
    with pytest.raises(FloatingPointError, match=r"step \d+: the loss or its gradient is not finite.*--resume") as e:
        train.main(["--resume", run, "--lr", "1e30", "--steps", "30", "--save-every", "1"])
    bad_step = int(re.search(r"step (\d+)", str(e.value)).group(1))
    st = state(run)
    assert 6 <= int(st["step"]) < bad_step
    assert all(bool(torch.isfinite(v).all()) for part in ("model", "ema") for v in st[part].values())
    runs.load_run(run)                                    # which refuses non-finite weights
    # a save is refused outright if the weights are not finite
    ema = dict(st["ema"])
    ema["img_in.weight"] = ema["img_in.weight"] * float("nan")
    before = digest(run)
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        runs.save_checkpoint(run, runs.read_meta(run), 99, 1.0, [1.0] * 3, st["model"], st["optim"], ema)
    assert digest(run) == before
    # and sampling refuses weights that are not finite (as a diverged older run could have saved)
    from safetensors.torch import save_file
    save_file(ema, os.path.join(runs.checkpoint_dir(run), "model.safetensors"))
    with pytest.raises(ValueError, match=r"1 of \d+ weight tensors hold NaN or inf \(e.g. img_in.weight\)"):
        sample.main(["--ckpt", run, "--prompt", "a red circle", "--out", str(tmp_path / "x.png")])


def test_a_save_killed_between_its_files_leaves_the_previous_checkpoint(trained, tmp_path, monkeypatch):
    run = copy_run(trained[0], tmp_path)
    before, st = digest(run), state(run)
    save = lambda: runs.save_checkpoint(run, runs.read_meta(run), 7, 1.0, [1.0] * 3, st["model"], st["optim"],
                                        st["ema"])

    def dies_midway(tensors, path, **kw):                 # state.pt is written; model.safetensors half
        open(path, "wb").write(b"\0" * 1000)
        raise KeyboardInterrupt
    monkeypatch.setattr(runs, "save_file", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        save()
    assert digest(run) == before                          # the step-6 unit untouched, no debris
    # a full disk: the same, and the message says so
    def disk_full(obj, path):
        open(path, "wb").write(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(runs.torch, "save", disk_full)
    with pytest.raises(OSError, match="disk full while saving step 7.*previous checkpoint is intact"):
        save()
    assert digest(run) == before
    # kill -9 cleans nothing up: what it leaves (a half-written folder, a complete but uncommitted
    # one, a temporary config.json) is never read, and the next train.py sweeps it away
    os.makedirs(os.path.join(run, "step_0000007.tmp"))
    open(os.path.join(run, "step_0000007.tmp", "state.pt"), "wb").write(b"\0" * 10)
    shutil.copytree(runs.checkpoint_dir(run), os.path.join(run, "step_0000008"))
    open(os.path.join(run, "config.json.4242.tmp"), "w").write('{"step": 8, "checkpoint": "step_0000008"')
    model, meta = runs.load_run(run)
    assert meta["step"] == int(runs.load_checkpoint(run)["step"]) == 6
    assert all(torch.equal(v, st["ema"][k]) for k, v in model.state_dict().items())
    runs.release(runs.claim(run, resume=True))
    assert digest(run) == before


def test_a_run_folder_of_the_old_layout_loads_and_resumes(trained, tmp_path):
    run = copy_run(trained[0], tmp_path)
    meta = json.load(open(os.path.join(run, "config.json")))
    folder = os.path.join(run, meta.pop("checkpoint"))    # before step folders: files at the top
    for f in ("state.pt", "model.safetensors"):
        shutil.move(os.path.join(folder, f), os.path.join(run, f))
    os.rmdir(folder)
    open(os.path.join(run, "config.json"), "w").write(json.dumps(meta))
    assert int(state(run)["step"]) == 6 and runs.load_run(run)[1]["step"] == 6
    train.main(["--resume", run, "--steps", "7"])
    assert int(state(run)["step"]) == 7 and not os.path.exists(os.path.join(run, "state.pt"))
    assert json.load(open(os.path.join(run, "config.json")))["checkpoint"] == "step_0000007"


def test_resume_keeps_the_model_records_new_flags_and_trims_the_log(trained, tmp_path):
    run = copy_run(trained[0], tmp_path)
    for flags, match in ((["--preset", "cifar"], "--preset cifar cannot change a saved model"),
                         (["--set", "width=64"], "--set width=64 cannot change a saved model .*width=32"),
                         (["--variant", "baseline"], "--variant baseline cannot change")):
        with pytest.raises(ValueError, match=match):
            train.main(["--resume", run, "--steps", "8", *flags])
    with open(os.path.join(run, "log.jsonl"), "a") as f:  # lines of a run killed before it saved them
        f.write(json.dumps({"step": 7}) + "\n" + json.dumps({"step": 8})[:5])
    train.main(["--resume", run, "--steps", "7", "--batch-size", "16", "--set", "width=32"])   # the same width: fine
    meta = json.load(open(os.path.join(run, "config.json")))
    assert (meta["args"]["batch_size"], meta["args"]["steps"], meta["step"]) == (16, 7, 7)
    assert [json.loads(line)["step"] for line in open(os.path.join(run, "log.jsonl"))] == [1, 2, 3, 4, 5, 6, 7]
    with pytest.raises(ValueError, match="already at step 7"):
        train.main(["--resume", run, "--steps", "5"])


# -----------------------------------------------------------------------------
# Nothing read from outside: a run folder's encoder ids never reach the network


@pytest.fixture
def no_network(monkeypatch):
    """Every way out to the hub fails loudly and is recorded."""
    import huggingface_hub.constants
    import huggingface_hub.file_download
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args[:2])
        raise OSError("this test allows no network")
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(huggingface_hub.file_download, "get_hf_file_metadata", refuse)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    import huggingface_hub.utils._detect_agent as agent     # huggingface_hub 2.x fetches this once per
    monkeypatch.setattr(agent, "_registry", None, raising=False)   # process: make it try again here
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return calls


def test_a_run_config_naming_a_hub_id_makes_no_network_call(trained, tmp_path, no_network):
    run = copy_run(trained[0], tmp_path)
    edit_config(run, text_encoder="attacker/evil-encoder")
    out = str(tmp_path / "x.png")
    with pytest.raises(OSError, match="never downloaded: pass --text-encoder attacker/evil-encoder"):
        sample.main(["--ckpt", run, "--prompt", "a red circle", "--out", out])
    edit_config(run, text_encoder="all-MiniLM-L6-v2", vae="attacker/evil-vae")   # the bundled one still loads
    with pytest.raises(OSError, match="never downloaded: pass --set vae=attacker/evil-vae"):
        train.main(["--resume", run, "--steps", "7"])
    assert no_network == []
    # typed by the user, an id may be fetched: the guard above does see network calls
    with pytest.raises(OSError, match="could not download"):
        sample.main(["--ckpt", run, "--prompt", "a red circle", "--out", out, "--vae", "attacker/evil-vae"])
    assert no_network


# -----------------------------------------------------------------------------
# WebDataset shards end to end


def test_webdataset_training_runs_three_steps_and_resumes_exactly(tmp_path):
    rng = np.random.default_rng(0)
    for s in range(2):
        with tarfile.open(tmp_path / f"shard-{s}.tar", "w") as tf:
            for j in range(6):
                png = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(png, format="PNG")
                for ext, payload in (("png", png.getvalue()), ("txt", f"picture {s} {j}".encode())):
                    info = tarfile.TarInfo(f"{s}{j:04d}.{ext}")
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
    args = MINI + ["--out", str(tmp_path), "--data", str(tmp_path / "shard-{0..1}.tar"), "--steps", "3"]
    straight = train.main(args + ["--name", "straight"])
    halves = train.main(args + ["--name", "halves", "--stop-at", "2"])
    assert int(state(halves)["step"]) == 2
    train.main(["--resume", halves])
    a, b = state(straight), state(halves)
    assert int(a["step"]) == int(b["step"]) == 3
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])   # it read the same batches


# -----------------------------------------------------------------------------
# Bad flags: refused before any model, encoder or data is loaded


TRAIN_FLAGS = [("--batch-size 0", "--batch-size 0"), ("--batch-size -1", "--batch-size -1"),
               ("--grad-accum 0", "--grad-accum 0"), ("--save-every 0", "--save-every 0"),
               ("--log-every 0", "--log-every 0"), ("--warmup -1", "--warmup -1"), ("--minutes 0", "--minutes 0"),
               ("--lr nan", "--lr nan"), ("--lr -1", "--lr -1"), ("--beta2 1.5", "--beta2 1.5"),
               ("--ema 2", "--ema 2"), ("--ema 1", "--ema 1"), ("--steps 0", "--steps 0"), ("--steps -5", "--steps -5"),
               ("--cfg nan", "--cfg nan"), ("--cfg -1", "--cfg -1"), ("--seed -1", "--seed -1"),
               ("--workers -1", "--workers -1"), ("--stop-at 0", "--stop-at 0"), ("--sample-steps abc", "--sample-steps"),
               ("--data /no/such/folder", "no such folder or shard"), ("--data /no/x-{0..3}.tar", "no such folder or shard"), ("--set width=abc", "width takes an int"),
               ("--set width=-16", "width must be a positive int"), ("--set patch=0", "patch must be a positive"),
               ("--set nested=maybe", "nested takes true or false"), ("--device cuda:99", "--device cuda:99"),
               ("--device foo", "not a device name"), ("--out FILE", "is a file"), ("--name=", "--name is empty")]


@pytest.mark.parametrize("flags,match", TRAIN_FLAGS)
def test_train_refuses_bad_flags_before_loading_anything(flags, match, tmp_path, monkeypatch):
    nothing = lambda *a, **k: pytest.fail("loaded or created something before checking the flags")
    monkeypatch.setattr(data, "load_encoders", nothing)
    monkeypatch.setattr(runs, "claim", nothing)
    (tmp_path / "FILE").write_text("notes")
    flags = [f.replace("FILE", str(tmp_path / "FILE")) for f in flags.split()]
    with pytest.raises(ValueError, match=re.escape(match)):
        train.main(MINI + ["--out", str(tmp_path), "--steps", "3"] + flags)


SAMPLE_FLAGS = [("--n 0", "--n 0"), ("--batch-size 0", "--batch-size 0"), ("--res 0", "--res 0"),
                ("--res -32", "--res -32"), ("--cfg nan", "--cfg nan"), ("--cfg -5", "--cfg -5"),
                ("--sample-steps abc", "--sample-steps abc"), ("--seed -1", "--seed -1"), ("--device cuda:99", "cuda:99"),
                ("--out FILE/y.png", "cannot write to"), ("--prompts-file DIR", "is a folder"),
                ("--prompts-file LATIN1", r"latin1.txt:2 is not UTF-8 \(byte 0xe9")]


@pytest.mark.parametrize("flags,match", SAMPLE_FLAGS)
def test_sample_refuses_bad_flags_before_loading_anything(flags, match, tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "load", lambda *a, **k: pytest.fail("loaded the run before checking the flags"))
    (tmp_path / "FILE").write_text("notes")
    (tmp_path / "latin1.txt").write_bytes(b"a red circle\ncaf\xe9 au lait\n")
    subs = {"FILE": str(tmp_path / "FILE"), "DIR": str(tmp_path), "LATIN1": str(tmp_path / "latin1.txt")}
    flags = [subs.get(f, f.replace("FILE", subs["FILE"])) for f in flags.split()]
    with pytest.raises((ValueError, OSError), match=match):
        sample.main(["--ckpt", str(tmp_path / "run"), "--prompt", "a red circle"] + flags)


def test_prompts_file_accepts_bom_crlf_and_a_blank_last_line(tmp_path):
    p = tmp_path / "p.txt"
    p.write_bytes(b"\xef\xbb\xbfa red circle\r\ntwo blue squares\r\n\r\n\n")
    assert sample.read_prompts(str(p)) == ["a red circle", "two blue squares"]


def test_a_user_error_is_one_line_not_a_traceback(tmp_path):
    out = subprocess.run([sys.executable, "train.py", "--batch-size", "0", "--out", str(tmp_path)], cwd=HERE,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stderr.strip() == "error: --batch-size 0: give at least 1", out.stderr


@pytest.mark.parametrize("env, spin", [({}, "30000000"), ({"OMP_WAIT_POLICY": "passive"}, "0"),
                                       ({"GOMP_SPINCOUNT": "1000"}, "1000"), ({"LOCAL_RANK": "0"}, "300000")])
def test_openmp_threads_spin_a_while_unless_told_or_under_torchrun(env, spin):
    # libgomp reports the spin count it read when torch loaded it (300000 is its default), so
    # this fails if train.py sets it after importing torch
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "LOCAL_RANK")}
    out = subprocess.run([sys.executable, "-c", "import train"], cwd=HERE, capture_output=True, text=True, timeout=120,
                         env={**clean, **env, "OMP_DISPLAY_ENV": "verbose"})
    assert f"GOMP_SPINCOUNT = '{spin}'" in out.stderr, out.stderr[-2000:]
