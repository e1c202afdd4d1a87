"""
End-to-end tests of train.py and sample.py on a miniature model (width 32): bit-exact
resume, Ctrl-C, atomic and pickle-free checkpoints, the files a run writes, clear errors
for bad input. Run: python -m pytest -q test_train.py
"""
import json
import os
import pickle
import re
import signal
import subprocess
import sys
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
MINI = ["--set", "width=32", "--set", "heads=2", "--batch-size", "8", "--dtype", "fp32", "--workers", "0",
        "--log-every", "1", "--sample-steps", "1,1,1", "--warmup", "2"]


def state(run):
    return runs.load_checkpoint(run)


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
    assert sorted(os.listdir(straight)) == ["config.json", "log.jsonl", "samples.png", "samples.txt", "stages.png",
                                            "stages.txt", "step_0000006"]    # no lock, no .tmp left behind
    meta = json.load(open(os.path.join(straight, "config.json")))
    assert meta["checkpoint"] == "step_0000006"
    assert meta["preset"] == "tiny" and meta["data"] == "shapes" and meta["text_encoder"] == "all-MiniLM-L6-v2"
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
    assert open(path).read() == "old"


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
    cmd = [sys.executable, "train.py", *MINI, "--out", str(tmp_path), "--name", "c", "--steps", "100000"]
    proc = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "c" / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= 2):
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "train.py --resume" in out
    step = int(state(str(tmp_path / "c"))["step"])
    assert step >= 2 and json.load(open(tmp_path / "c" / "config.json"))["step"] == step


def test_sample_cli_writes_one_png_per_prompt_and_a_grid(trained, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\ntwo blue squares\na green triangle above a white circle\n")
    out = tmp_path / "imgs"
    sample.main(["--ckpt", trained[0], "--prompts-file", str(prompts), "--out", str(out), "--steps", "1,1,1", "--stages"])
    names = sorted(os.listdir(out))
    assert names == ["0000.png", "0001.png", "0002.png", "grid.png", "grid.png.txt"]
    assert Image.open(out / "0000.png").size == (32, 32)
    assert (out / "grid.png.txt").read_text().splitlines() == prompts.read_text().splitlines()


def test_stage_check_with_an_oracle_gets_everything_right(trained, capsys):
    # An oracle that knows the very renders stage_check draws (same seed) must score 1 from
    # every window's start: captions, renders, start states and windows all line up.
    from test_nami import Oracle

    class NoText:
        def encode(self, captions):
            n = len(captions)
            return torch.zeros(n, 2, 384), torch.ones(n, 2, dtype=torch.bool), torch.zeros(n, 384)

    cfg, n = nami.preset("tiny"), 30
    rng = np.random.default_rng(0)
    renders = [shapes.render(o) for _, o in (shapes.sample_scene(rng, "single") for _ in range(n))]
    oracle = Oracle(cfg, data.to_tensor(np.stack(renders)), nami.window_bounds(cfg.windows))
    result = sample.stage_check(oracle, NoText(), (2, 2, 2), seed=0, n=n)
    assert result == {f"from_window_{k}": {"circle": 1.0, "square": 1.0, "triangle": 1.0, "all": 1.0} for k in (1, 2, 3)}
    # and the command line, on a trained (miniature) run
    result = sample.main(["--ckpt", trained[0], "--stage-check", "--steps", "1,1,1"])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line == result and all(0 <= v["all"] <= 1 for v in line.values()) and len(line) == 3


def test_sample_eval_prints_scores(trained, capsys):
    result = sample.main(["--ckpt", trained[0], "--eval", "--steps", "1,1,1", "--batch-size", "128"])
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
    assert re.search(r"skipped [12] unreadable", capsys.readouterr().out)  # index 3 is drawn at steps 0 and 1


def test_dry_run_reports_2b(capsys):
    train.main(["--preset", "2b", "--dry-run", "--batch-size", "8", "--ranks", "8", "--fsdp", "--checkpointing"])
    out = capsys.readouterr().out
    assert "params: 2.04B" in out
    assert out.count("GFLOP forward") == 3 and "memory per GPU" in out and "-59." in out


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
    # a tiny run uses tiny's phases, and a resumed run keeps the phases it started with
    log = [json.loads(line) for line in open(os.path.join(trained[0], "log.jsonl"))]
    assert all(r["ratios"] == [4, 8, 1] for r in log)
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


def test_baseline_and_piecewise_runs_finish(tmp_path):
    # the K = 1 baseline samples its end-of-run grid with the SUM of --sample-steps (one window)
    run = train.main(MINI + ["--out", str(tmp_path), "--name", "base", "--steps", "2", "--baseline"])
    meta = json.load(open(os.path.join(run, "config.json")))
    assert meta["model"]["stage_layers"] == [6] and os.path.isfile(os.path.join(run, "samples.png"))
    assert all(r["ratios"] == [1] for r in map(json.loads, open(os.path.join(run, "log.jsonl"))))
    assert nami.parse_steps("2,3,4", runs.load_run(run)[0].cfg.K) == (9,)
    run = train.main(MINI + ["--out", str(tmp_path), "--name", "pw", "--steps", "2", "--no-nested"])
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
