"""
The shapes world: a procedural, captioned toy dataset and an exact GenEval-style scorer.

NAMI is evaluated on GenEval, which runs an object detector over generated images to check
the objects, counts, colours and positions a prompt asked for. Here the world is small enough
for the "detector" to be exact: shapes are drawn in a fixed palette on black, so an image can
be parsed back into objects with connected components. That lets a tiny text-to-image model
train on a CPU in minutes and still be scored for prompt following the GenEval way.
Everything is generated on the fly from a seed; there are no files.

Fixed spec (other tools depend on it):
- 32x32 RGB uint8, black background, hard edges, 7 pure colours (COLOURS).
- circle / square / triangle (apex up), bounding-box side 8..12 px, 1 to 3 objects per image,
  bounding boxes at least 1 px apart (never touching, even diagonally), fully inside the image.
- captions: "a red circle" | "two red circles" | "a red circle and a blue square"
  | "a red circle to the left of a blue square" (also: to the right of, above, below).
  Relations compare pixel centroids (x right, y down): in generated images the main-axis offset
  is >= 6 px in the stated direction and strictly larger than the offset along the other axis.
- categories: single, counting, two_objects, position, attribution (form 3 is judged twice);
  overall = unweighted mean of the category accuracies (GenEval convention).

Self-check: python shapes.py   (sample captions, batch speed, scorer accuracy on clean/noise/blank)
"""

import functools
import hashlib
import re
import time

import numpy as np

COLOURS = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
    "magenta": (255, 0, 255), "cyan": (0, 255, 255), "white": (255, 255, 255),
}
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("to the left of", "to the right of", "above", "below")
FORMS = ("single", "counting", "two_objects", "position")  # caption forms 1..4
_COLOUR_NAMES = tuple(COLOURS)
CATEGORIES = ("single", "counting", "two_objects", "position", "attribution")

IMAGE_SIZE = 32
MIN_SIDE, MAX_SIDE = 8, 12
MIN_OFFSET = 6  # px: generated relations are at least this clear along their main axis
TRIES = 16      # candidate layouts drawn and tested at once per scene by sample_scenes
NUMBERS = {2: "two", 3: "three"}
# train.py's end-of-run picture (and assets/): one prompt of every caption form
PREVIEW_PROMPTS = ["a red circle", "a green square", "a blue triangle", "two yellow squares",
                   "three white circles", "a magenta triangle and a cyan circle",
                   "a red square to the left of a blue circle", "a white triangle above a green square"]

# Parser thresholds. Components smaller than MIN_AREA px are specks, not objects: the smallest
# legal shape, a size-8 triangle, has 40 px (size-8 circle 52, square 64), while in uniform noise
# (each palette colour ~1/8 of the pixels) no 4-connected clump of 16 px turned up in 1000 images.
MIN_AREA = 16
# Shape features, measured on the box spanned by rows/columns holding >= 2 of the object's
# pixels (see _extent). Fill = area / box area: square 1.0, circle 0.78..0.85, triangle 0.58..0.68.
SQUARE_FILL = 0.9
# Drop = centroid depth / box height: 0.5 for the up-down symmetric circle and square,
# 0.59..0.64 for an apex-up triangle (2/3 in the continuum). It is the "top narrower than bottom"
# test integrated over the whole shape, so a few wrong pixels cannot flip it.
TRIANGLE_DROP = 0.55

# ----------------------------------------------------------------------------- rendering


@functools.lru_cache(maxsize=None)
def _mask(shape, side):
    """(side, side) boolean mask of a shape in its own box, and its pixel centroid in that box."""
    c = np.arange(side) + 0.5 - side / 2  # pixel-centre offsets from the box centre
    dx, dy = c[None, :], c[:, None]
    if shape == "circle":  # pixel centres within radius side/2 of the box centre
        m = dx ** 2 + dy ** 2 <= (side / 2) ** 2
    elif shape == "square":  # the full box
        m = np.ones((side, side), bool)
    elif shape == "triangle":
        # Apex at top-centre, base = bottom edge: the half-width at depth t below the top is t/2.
        # We test each pixel centre's column against the half-width at the pixel's *bottom* edge
        # (depth row+1) rather than at its centre, so the apex row is lit for even sides too and
        # every shape spans exactly its side x side box.
        m = np.abs(dx) <= (np.arange(side)[:, None] + 1) / 2
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    m.setflags(write=False)  # cached and shared: nobody may edit it in place
    ys, xs = np.nonzero(m)
    return m, (xs.mean() + 0.5, ys.mean() + 0.5)


# (shape, side - MIN_SIDE, 2): every legal object's centroid (x, y) in its own box
_CENTRES = np.array([[_mask(s, d)[1] for d in range(MIN_SIDE, MAX_SIDE + 1)] for s in SHAPES])


def centroid(obj):
    """Pixel centroid (x, y) of an object (colour, shape, x0, y0, side), in image coordinates."""
    _, shape, x0, y0, side = obj
    cx, cy = _mask(shape, side)[1]
    return x0 + cx, y0 + cy


def render(objects, size=IMAGE_SIZE):
    """Draw objects [(colour, shape, x0, y0, side), ...] onto black; (x0, y0) = top-left of box."""
    image = np.zeros((size, size, 3), np.uint8)
    for colour, shape, x0, y0, side in objects:
        if colour not in COLOURS:
            raise ValueError(f"unknown colour {colour!r}; expected one of {tuple(COLOURS)}")
        if not (side >= 1 and 0 <= x0 and x0 + side <= size and 0 <= y0 and y0 + side <= size):
            raise ValueError(f"box x0={x0} y0={y0} side={side} is not inside a {size}x{size} image")
        image[y0:y0 + side, x0:x0 + side][_mask(shape, side)[0]] = COLOURS[colour]
    return image


def relation_holds(relation, a, b, margin=0.0):
    """Does centroid a stand in `relation` to centroid b? Main-axis offset must point the stated
    way, exceed |offset along the other axis| and be >= margin (generation uses MIN_OFFSET)."""
    dx, dy = b[0] - a[0], b[1] - a[1]  # dx > 0: a is left of b; dy > 0: a is above b (y down)
    main, other = {"to the left of": (dx, dy), "to the right of": (-dx, dy),
                   "above": (dy, dx), "below": (-dy, dx)}[relation]
    return (main > abs(other)) & (main >= margin)       # elementwise for arrays of centroids


# ----------------------------------------------------------------------------- captions


def _caption(form, kinds, relation=None):
    (c1, s1) = kinds[0]
    if form == "single":
        return f"a {c1} {s1}"
    if form == "counting":
        return f"{NUMBERS[len(kinds)]} {c1} {s1}s"
    (c2, s2) = kinds[1]
    link = "and" if form == "two_objects" else relation
    return f"a {c1} {s1} {link} a {c2} {s2}"


def sample_scenes(rng, n, form=None, weights=None):
    """n random (caption, objects) scenes; form None = each drawn from FORMS (uniform, or in
    proportion to `weights`). Vectorised over the scenes: a batch's data was ~8% of a training
    step when every scene made its own generator calls (each costs ~10 us)."""
    if form is not None and form not in FORMS:
        raise ValueError(f"unknown form {form!r}; expected one of {FORMS} or None")
    if form is not None:
        f = np.full(n, FORMS.index(form))
    elif weights:
        f = np.searchsorted(np.cumsum(weights) / sum(weights), rng.random(n), side="right").clip(max=len(FORMS) - 1)
    else:
        f = rng.integers(len(FORMS), size=n)
    # colour and shape of objects 1 and 2, the relation, and three objects instead of two (counting)
    c1, s1, c2, s2, rel, three = rng.integers((len(COLOURS), len(SHAPES)) * 2 + (len(RELATIONS), 2), size=(n, 6)).T
    pairs = f >= 2                                    # two_objects, position: two different (colour, shape)
    while (same := np.flatnonzero(pairs & (c1 == c2) & (s1 == s2))).size:
        c2[same], s2[same] = rng.integers((len(COLOURS), len(SHAPES)), size=(same.size, 2)).T
    count = np.select([f == 0, f == 1], [1, 2 + three], 2)                     # objects per scene
    colour = np.stack([c1, np.where(f == 1, c1, c2), c1], 1)                    # (n, 3); slot 3: counting only
    shape = np.stack([s1, np.where(f == 1, s1, s2), s1], 1)
    # Sizes are drawn once (so they stay uniform), then positions by rejection sampling until
    # nothing touches and the relation is unambiguous: each scene keeps the first acceptable of
    # i.i.d. uniform tries, drawn TRIES at a time. The hardest case, three 12 px boxes, accepts
    # ~1 try in 30.
    sides = rng.integers(MIN_SIDE, MAX_SIDE + 1, (n, 3))
    centre = _CENTRES[shape, sides - MIN_SIDE]                                  # (n, 3, 2) in each box
    xy = np.zeros((n, 2, 3), np.int64)
    todo = np.arange(n)
    while todo.size:
        sd, k = sides[todo], count[todo]
        cand = rng.integers(0, IMAGE_SIZE - sd[None, :, None, :] + 1, (TRIES, todo.size, 2, 3))   # (T, m, x|y, object)
        x, y = cand[:, :, 0], cand[:, :, 1]                                     # (T, m, 3)
        ok = np.ones(x.shape[:2], bool)
        for i, j in ((0, 1), (0, 2), (1, 2)):         # boxes at least 1 px apart on some axis
            apart = ((x[..., j] > x[..., i] + sd[:, i]) | (x[..., i] > x[..., j] + sd[:, j])
                     | (y[..., j] > y[..., i] + sd[:, i]) | (y[..., i] > y[..., j] + sd[:, j]))
            ok &= apart | (j >= k)                    # only between objects the scene has
        cen1, cen2 = (np.stack([x[..., i] + centre[todo, i, 0], y[..., i] + centre[todo, i, 1]]) for i in (0, 1))
        for q, relation in enumerate(RELATIONS):      # (2, T, m) centroids; each scene's own relation
            ask = (f[todo] == 3) & (rel[todo] == q)
            ok[:, ask] &= relation_holds(relation, cen1[:, :, ask], cen2[:, :, ask], MIN_OFFSET)
        hit = ok.any(0)
        first = ok.argmax(0)[hit]
        xy[todo[hit]] = cand[first, np.flatnonzero(hit)]
        todo = todo[~hit]
    scenes = []
    for i in range(n):
        kinds = [(_COLOUR_NAMES[colour[i, j]], SHAPES[shape[i, j]]) for j in range(count[i])]
        objects = [(c, s, int(xy[i, 0, j]), int(xy[i, 1, j]), int(sides[i, j])) for j, (c, s) in enumerate(kinds)]
        scenes.append((_caption(FORMS[f[i]], kinds, RELATIONS[rel[i]]), objects))
    return scenes


def sample_scene(rng, form=None, weights=None):
    """One random (caption, objects) scene, as sample_scenes."""
    return sample_scenes(rng, 1, form, weights)[0]


OPPOSITE = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below", "below": "above"}


def mirrored(caption, objects):
    """The twin of a two-object position scene: the layout mirrored along the relation's axis
    (shapes re-drawn upright) and the relation word swapped, "a red circle to the left of a
    blue square" -> "... to the right of ...". None if the mirrored layout's relation is not
    clear by MIN_OFFSET (a triangle's centroid sits low in its box)."""
    relation = next((r for r in RELATIONS if f" {r} " in caption), None)
    if relation is None or len(objects) != 2:
        return None
    axis = 2 if relation.endswith(("left of", "right of")) else 3
    twin = [tuple(IMAGE_SIZE - o[axis] - o[4] if i == axis else v for i, v in enumerate(o)) for o in objects]
    if not relation_holds(OPPOSITE[relation], centroid(twin[0]), centroid(twin[1]), MIN_OFFSET):
        return None
    return caption.replace(f" {relation} ", f" {OPPOSITE[relation]} "), twin


def options(spec):
    """make_batch's options from a --data spec: "shapes", or "shapes:" followed by
    comma-separated "mirror" and "forms=a:b:c:d" (weights of FORMS), e.g. "shapes:mirror"."""
    name, _, rest = spec.partition(":")
    if name != "shapes":
        raise ValueError(f"{spec!r} is not a shapes-world spec")
    out = {}
    for opt in filter(None, rest.split(",")):
        key, _, value = opt.partition("=")
        try:
            if key == "mirror" and not value:
                out["mirror"] = True
            elif key == "forms" and len(value.split(":")) == len(FORMS):
                out["forms"] = tuple(float(v) for v in value.split(":"))
                if min(out["forms"]) < 0 or sum(out["forms"]) <= 0:
                    raise ValueError
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"--data {spec}: options are 'mirror' and 'forms=a:b:c:d' (weights of {', '.join(FORMS)})") from None
    return out


def make_batch(n, seed, index=0, forms=None, mirror=False):
    """(n, 32, 32, 3) uint8 images and their captions; a pure function of (seed, index), so the
    training loop can pass index=step and a resumed run sees exactly the same batches.
    forms: weights of the caption forms (default uniform); mirror: every position scene is
    followed by its mirrored twin (a direct contrast for the relation word)."""
    rng = np.random.default_rng([seed, index])  # SeedSequence mixes both: no overlapping streams
    images = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    captions = []
    for caption, objects in sample_scenes(rng, n, weights=forms):
        twin = mirrored(caption, objects) if mirror else None
        for caption, objects in [(caption, objects)] + ([twin] if twin else []):
            if len(captions) < n:
                images[len(captions)] = render(objects)
                captions.append(caption)
    return images, captions


_OBJ = rf"a ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
_GRAMMARS = {
    "single": re.compile(_OBJ),
    "counting": re.compile(rf"(two|three) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})s"),
    "two_objects": re.compile(rf"{_OBJ} and {_OBJ}"),
    "position": re.compile(rf"{_OBJ} ({'|'.join(RELATIONS)}) {_OBJ}"),
}
GRAMMAR = ("'a {colour} {shape}' | '{two|three} {colour} {shape}s' | "
           "'a {colour} {shape} and a {colour} {shape}' | "
           "'a {colour} {shape} {relation} a {colour} {shape}' (two different colour-shape pairs), "
           f"colour in {tuple(COLOURS)}, shape in {SHAPES}, relation in {RELATIONS}")


def parse_caption(caption):
    """{'form', 'objects': [(colour, shape), ...], 'relation'} for a caption in the grammar."""
    text = caption.strip() if isinstance(caption, str) else None
    for form, pattern in _GRAMMARS.items():
        m = pattern.fullmatch(text) if text else None
        if not m:
            continue
        g = m.groups()
        if form == "single":
            return {"form": form, "objects": [g], "relation": None}
        if form == "counting":
            n = 2 if g[0] == "two" else 3
            return {"form": form, "objects": [g[1:]] * n, "relation": None}
        relation = g[2] if form == "position" else None
        kinds = [g[:2], g[-2:]]
        if kinds[0] != kinds[1]:
            return {"form": form, "objects": kinds, "relation": relation}
    raise ValueError(f"caption {caption!r} is outside the shapes grammar: {GRAMMAR}")

# ----------------------------------------------------------------------------- scoring

# The palette is the 8 corners of the RGB cube, so "nearest palette colour by RGB distance"
# is exactly a per-channel threshold at 128; dim pixels land on black = background.
_CODE_COLOUR = {4 * (r > 0) + 2 * (g > 0) + (b > 0): name for name, (r, g, b) in COLOURS.items()}


def _check_image(image):
    image = np.asarray(image)
    if image.shape != (IMAGE_SIZE, IMAGE_SIZE, 3) or image.dtype != np.uint8:
        raise ValueError(f"expected a ({IMAGE_SIZE}, {IMAGE_SIZE}, 3) uint8 RGB image, got shape "
                         f"{image.shape} dtype {image.dtype} (floats in [0, 1]: "
                         "(x * 255).round().clip(0, 255).astype(np.uint8))")
    return image


def _components(code):
    """4-connected components of equal nonzero code: per-pixel labels, -1 for background.
    4- rather than 8-connectivity because each palette colour covers ~1/8 of a noise image, and
    with 8 neighbours such pixels chain into object-sized clumps (5% of noise images had one of
    >= 16 px); with 4 they never did. Rendered shapes have contiguous, overlapping rows, so they
    are 4-connected, and it also keeps stray same-colour pixels from joining a shape diagonally."""
    h, w = code.shape
    none = h * w
    labels = np.where(code > 0, np.arange(h * w).reshape(h, w), none)
    pc = np.pad(code, 1)
    shifts = [(0, 1), (2, 1), (1, 0), (1, 2)]  # up, down, left, right in the padded frame
    links = [((dy, dx), (code > 0) & (pc[dy:dy + h, dx:dx + w] == code)) for dy, dx in shifts]
    while True:  # every pixel takes its smallest linked neighbour's label until nothing changes
        pl = np.pad(labels, 1, constant_values=none)
        new = labels
        for (dy, dx), same in links:
            new = np.where(same, np.minimum(new, pl[dy:dy + h, dx:dx + w]), new)
        if np.array_equal(new, labels):
            return np.where(code > 0, labels, -1)
        labels = new


def _extent(coords):
    """[start, end) of the pixel rows (or columns) holding at least two of a component's pixels."""
    counts = np.bincount(coords)
    full = np.nonzero(counts >= 2)[0]
    return (full[0], full[-1] + 1) if len(full) else (coords.min(), coords.max() + 1)


def parse_image(image):
    """Objects found in an image: [{'colour', 'shape', 'cx', 'cy', 'area', 'bbox'}, ...],
    with the centroid (cx, cy) in the same pixel-centre coordinates as centroid()."""
    bits = _check_image(image) >= 128
    code = 4 * bits[..., 0] + 2 * bits[..., 1] + bits[..., 2]
    labels = _components(code)
    ids, counts = np.unique(labels[labels >= 0], return_counts=True)
    found = []
    for i in ids[counts >= MIN_AREA]:
        ys, xs = np.nonzero(labels == i)
        cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
        # Measure the box on rows and columns holding >= 2 pixels, so a stray pixel stuck to a
        # square's side cannot stretch its box and make it look like a circle.
        bx, by = _extent(xs), _extent(ys)
        fill = len(xs) / ((bx[1] - bx[0]) * (by[1] - by[0]))
        drop = (cy - by[0]) / (by[1] - by[0])
        shape = "triangle" if drop > TRIANGLE_DROP else "square" if fill > SQUARE_FILL else "circle"
        found.append({"colour": _CODE_COLOUR[code[ys[0], xs[0]]], "shape": shape, "cx": float(cx),
                      "cy": float(cy), "area": len(xs),
                      "bbox": (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)})
    return found


def score(caption, image):
    """The categories this caption is judged on -> was the image correct?"""
    prompt = parse_caption(caption)
    found = parse_image(image)
    got = sorted((o["colour"], o["shape"]) for o in found)
    want = sorted(prompt["objects"])
    form = prompt["form"]
    if form in ("single", "counting"):  # exact count, every object the named colour and shape
        return {form: got == want}
    if form == "two_objects":
        return {"two_objects": sorted(s for _, s in got) == sorted(s for _, s in want),
                "attribution": got == want}
    ok = got == want  # position: both objects right, then the relation between them
    if ok:
        a, b = ([o for o in found if (o["colour"], o["shape"]) == k][0] for k in prompt["objects"])
        ok = relation_holds(prompt["relation"], (a["cx"], a["cy"]), (b["cx"], b["cy"]))
    return {"position": ok}


def direction(caption, image):
    """For a position prompt whose two objects were drawn right and apart along the relation's
    axis (the larger centroid offset): is their order along it the asked one? None otherwise.
    Tells "the layout is right but mirrored" apart from "the objects or the axis are wrong"."""
    prompt = parse_caption(caption)
    if prompt["form"] != "position":
        return None
    found = parse_image(image)
    if sorted((o["colour"], o["shape"]) for o in found) != sorted(prompt["objects"]):
        return None
    a, b = ([o for o in found if (o["colour"], o["shape"]) == k][0] for k in prompt["objects"])
    dx, dy = b["cx"] - a["cx"], b["cy"] - a["cy"]
    horizontal = prompt["relation"] in ("to the left of", "to the right of")
    if (abs(dx) > abs(dy)) != horizontal:
        return None
    return relation_holds(prompt["relation"], (a["cx"], a["cy"]), (b["cx"], b["cy"]))


def evaluate(captions, images):
    """Accuracy per category (None where no caption of it), 'overall' = mean over the categories
    present (all five for eval_prompts()), 'n' = judgements per category, and 'direction': of
    the position images with the right objects on the right axis, the fraction in the asked
    order (0.5 = chance; not part of overall)."""
    if len(captions) != len(images):
        raise ValueError(f"{len(captions)} captions but {len(images)} images")
    hits, order = {c: [] for c in CATEGORIES}, []
    for caption, image in zip(captions, images):
        for category, ok in score(caption, image).items():
            hits[category].append(ok)
        if (d := direction(caption, image)) is not None:
            order.append(d)
    result = {c: float(np.mean(v)) if v else None for c, v in hits.items()}
    present = [a for a in result.values() if a is not None]
    result["overall"] = float(np.mean(present)) if present else None
    result["n"] = {c: len(v) for c, v in hits.items()}
    result["direction"], result["n"]["direction"] = (float(np.mean(order)) if order else None), len(order)
    return result


def all_captions():
    """Every caption of the grammar (2163), in a fixed order: lets a trainer encode them all
    once, up front, in fixed batches."""
    kinds = [(c, s) for c in COLOURS for s in SHAPES]
    pairs = [(a, b) for a in kinds for b in kinds if a != b]
    return ([_caption("single", [k]) for k in kinds] + [_caption("counting", [k] * n) for n in NUMBERS for k in kinds]
            + [_caption("two_objects", p) for p in pairs]
            + [_caption("position", p, r) for r in RELATIONS for p in pairs])


EVAL_SEED = "nami-shapes-eval-v1"


@functools.lru_cache(maxsize=None)
def _eval_prompts():
    # Picks are ordered by a SHA-256 hash of the seed and the candidate, not by numpy's RNG, so
    # the list cannot drift with numpy versions and shares nothing with training streams.
    rank = lambda cands: sorted(cands, key=lambda t: hashlib.sha256(f"{EVAL_SEED}|{t}".encode())
                                .digest())
    kinds = [(c, s) for c in COLOURS for s in SHAPES]
    ordered = [(a, b) for a in kinds for b in kinds if a != b]
    prompts = [_caption("single", [k]) for k in kinds]  # all 21: there are no more
    prompts += [_caption("counting", [k] * n) for n in NUMBERS for k in kinds]  # all 42
    pairs = []  # 120 of the 210 unordered pairs, each in a hash-chosen order
    for a, b in rank(ordered):
        if len(pairs) < 120 and (b, a) not in pairs:
            pairs.append((a, b))
    prompts += [_caption("two_objects", p) for p in pairs]
    for r in RELATIONS:  # 30 per relation
        prompts += [_caption("position", p, r) for p in rank([(a, b, r) for a, b in ordered])[:30]]
    return tuple(prompts)


def eval_prompts():
    """The fixed evaluation list: 303 unique prompts (21 single, 42 counting, 120 two-object,
    120 position), the same on every call and machine."""
    return list(_eval_prompts())


if __name__ == "__main__":
    images, captions = make_batch(8, seed=0)
    print("samples:", *captions, sep="\n  ")
    t = time.perf_counter()
    make_batch(64, seed=0, index=1)
    print(f"make_batch(64): {1e3 * (time.perf_counter() - t):.1f} ms")
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(1000)]
    clean = evaluate([c for c, _ in scenes], [render(o) for _, o in scenes])
    print(f"clean renders (1000 scenes): overall {clean['overall']:.3f}", clean["n"])
    prompts = eval_prompts()
    noise = rng.integers(0, 256, (len(prompts), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for name, images in (("uniform noise", noise), ("blank", np.zeros_like(noise))):
        result = evaluate(prompts, images)
        print(f"{name} ({len(prompts)} eval prompts): overall {result['overall']:.3f}")
