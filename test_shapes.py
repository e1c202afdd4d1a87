"""Tests for shapes.py. Checks are against facts written out here (palette, grammar, geometry),
not against the module's own helpers. Run: python -m pytest -q test_shapes.py  (a few seconds)"""

import itertools

import numpy as np
import pytest

import shapes

PALETTE = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
           "yellow": (255, 255, 0), "magenta": (255, 0, 255), "cyan": (0, 255, 255),
           "white": (255, 255, 255)}
KINDS = [(c, s) for c in PALETTE for s in ("circle", "square", "triangle")]
RELS = ("to the left of", "to the right of", "above", "below")


def all_captions():
    """Every sentence of the grammar, spelled out independently: caption -> (form, relation)."""
    out = {f"a {c} {s}": ("single", None) for c, s in KINDS}
    out.update({f"{n} {c} {s}s": ("counting", None) for n in ("two", "three") for c, s in KINDS})
    for (c1, s1), (c2, s2) in itertools.permutations(KINDS, 2):
        out[f"a {c1} {s1} and a {c2} {s2}"] = ("two_objects", None)
        for r in RELS:
            out[f"a {c1} {s1} {r} a {c2} {s2}"] = ("position", r)
    return out


GRAMMAR = all_captions()


def object_mask(obj):
    """Pixels of one object, rendered alone."""
    return shapes.render([obj]).any(axis=2)


def dilate(mask):
    """3x3 (8-neighbour) dilation."""
    p = np.pad(mask, 1)
    return np.any([p[dy:dy + mask.shape[0], dx:dx + mask.shape[1]]
                   for dy in range(3) for dx in range(3)], axis=0)


def pixel_centroid(mask):
    ys, xs = np.nonzero(mask)
    return xs.mean(), ys.mean()


@pytest.fixture(scope="module")
def scenes():
    rng = np.random.default_rng(1234)
    return [shapes.sample_scene(rng, form) for form in shapes.FORMS for _ in range(750)]


def test_constants():
    assert shapes.COLOURS == PALETTE and list(shapes.COLOURS) == list(PALETTE)
    assert shapes.SHAPES == ("circle", "square", "triangle")
    assert shapes.RELATIONS == RELS
    assert shapes.FORMS == ("single", "counting", "two_objects", "position")
    assert shapes.CATEGORIES == ("single", "counting", "two_objects", "position", "attribution")


def test_scenes_match_their_captions(scenes):
    for caption, objects in scenes:
        form, relation = GRAMMAR[caption]  # KeyError = outside the grammar
        kinds = [(c, s) for c, s, *_ in objects]
        if form == "single":
            assert caption == "a {} {}".format(*kinds[0]) and len(kinds) == 1
        elif form == "counting":
            assert len(kinds) in (2, 3) and len(set(kinds)) == 1
            assert caption == "{} {} {}s".format({2: "two", 3: "three"}[len(kinds)], *kinds[0])
        else:
            assert len(kinds) == 2 and kinds[0] != kinds[1]
            link = "and" if form == "two_objects" else relation
            assert caption == "a {} {} {} a {} {}".format(*kinds[0], link, *kinds[1])


def test_geometry_palette_and_spacing(scenes):
    palette = {(0, 0, 0)} | set(PALETTE.values())
    sides = set()
    for _, objects in scenes[::3]:
        image = shapes.render(objects)
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
        assert set(map(tuple, image.reshape(-1, 3))) <= palette
        masks = []
        for colour, shape, x0, y0, side in objects:
            assert 8 <= side <= 12 and 0 <= x0 <= 32 - side and 0 <= y0 <= 32 - side
            sides.add(side)
            mask = object_mask((colour, shape, x0, y0, side))
            ys, xs = np.nonzero(mask)  # every shape spans exactly its box
            assert (xs.min(), ys.min()) == (x0, y0)
            assert (xs.max() + 1, ys.max() + 1) == (x0 + side, y0 + side)
            assert (image[mask] == PALETTE[colour]).all()
            masks.append(mask)
        for a, b in itertools.combinations(masks, 2):
            assert not (dilate(a) & b).any(), "objects touch"
    assert sides == set(range(8, 13))


def test_relations_are_unambiguous(scenes):
    n = 0
    for caption, objects in scenes:
        form, relation = GRAMMAR[caption]
        if form != "position":
            continue
        (x1, y1), (x2, y2) = (pixel_centroid(object_mask(o)) for o in objects)
        main, other = {"to the left of": (x2 - x1, y2 - y1), "to the right of": (x1 - x2, y2 - y1),
                       "above": (y2 - y1, x2 - x1), "below": (y1 - y2, x2 - x1)}[relation]
        assert main >= 6 and main > abs(other), caption
        n += 1
    assert n == 750


def test_make_batch_deterministic():
    a, ca = shapes.make_batch(16, seed=3, index=7)
    b, cb = shapes.make_batch(16, seed=3, index=7)
    c, cc = shapes.make_batch(16, seed=3, index=8)
    d, cd = shapes.make_batch(16, seed=4, index=7)
    assert a.shape == (16, 32, 32, 3) and a.dtype == np.uint8 and len(ca) == 16
    assert np.array_equal(a, b) and ca == cb
    assert not np.array_equal(a, c) and ca != cc
    assert not np.array_equal(a, d) and ca != cd
    _, captions = shapes.make_batch(400, seed=0)
    assert {GRAMMAR[c][0] for c in captions} == set(shapes.FORMS)


def reference_layout(rng, sides, relation=None):
    """Positions the plain way, one try at a time: uniform top-left corners inside the image
    until every pair of boxes is >= 1 px apart and, for a relation, object 1's pixel centroid
    lies >= 6 px that way from object 2's and further along that axis than across it."""
    while True:
        xy = [(int(rng.integers(0, 33 - d)), int(rng.integers(0, 33 - d))) for d in sides]
        boxes = [(x, y, x + d, y + d) for (x, y), d in zip(xy, sides)]
        if any(not (b[0] > a[2] or a[0] > b[2] or b[1] > a[3] or a[1] > b[3])
               for a, b in itertools.combinations(boxes, 2)):
            continue
        if relation:
            (cx1, cy1), (cx2, cy2) = (pixel_centroid(object_mask((c, s, x, y, d))) for (c, s, d), (x, y)
                                      in zip(relation[1], xy))
            dx, dy = cx2 - cx1, cy2 - cy1
            main, other = {"to the left of": (dx, dy), "to the right of": (-dx, dy), "above": (dy, dx),
                           "below": (-dy, dx)}[relation[0]]
            if not (main > abs(other) and main >= 6):
                continue
        return xy


def test_layouts_follow_plain_rejection_sampling():
    """sample_scenes tests many tries at once per scene; its layouts must be distributed as
    one-try-at-a-time rejection sampling's (chi-square homogeneity over position bins, for
    the most crowded case, three boxes, and for a relation, where the acceptance test matters)."""
    rng, ref = np.random.default_rng(5), np.random.default_rng(6)
    ours = [o for _, o in shapes.sample_scenes(rng, 1500, "counting") if len(o) == 3][:600]
    theirs = [reference_layout(ref, [side for *_, side in o]) for o in ours]
    left = [o for c, o in shapes.sample_scenes(rng, 3000, "position") if " to the left of " in c][:600]
    left_ref = [reference_layout(ref, [o[0][4], o[1][4]], ("to the left of", [(*o[0][:2], o[0][4]), (*o[1][:2], o[1][4])]))
                for o in left]
    assert len(ours) == len(left) == 600
    for a, b, key in [([o[0][2] for o in ours], [xy[0][0] for xy in theirs], "x of object 1, three boxes"),
                      ([o[1][3] for o in ours], [xy[1][1] for xy in theirs], "y of object 2, three boxes"),
                      ([o[1][2] - o[0][2] for o in left], [q[0] - p[0] for p, q in left_ref], "x gap, left of"),
                      ([o[1][3] - o[0][3] for o in left], [q[1] - p[1] for p, q in left_ref], "y gap, left of")]:
        edges = np.quantile(a + b, np.linspace(0, 1, 7)[1:-1])
        table = np.array([np.bincount(np.searchsorted(edges, v, side="right"), minlength=6) for v in (a, b)])
        expected = table.sum(1, keepdims=True) * table.sum(0) / table.sum()
        chi2 = ((table - expected) ** 2 / expected).sum()
        assert chi2 < 20.5, (key, table)              # 5 degrees of freedom: p = 0.001


def test_scorer_perfect_on_clean_renders(scenes):
    captions = [c for c, _ in scenes]
    result = shapes.evaluate(captions, [shapes.render(o) for _, o in scenes])
    assert result["n"] == {"single": 750, "counting": 750, "two_objects": 750,
                           "position": 750, "attribution": 750, "direction": 750}
    assert all(result[c] == 1.0 for c in shapes.CATEGORIES) and result["overall"] == 1.0 and result["direction"] == 1.0


@pytest.mark.parametrize("shape", ["circle", "square", "triangle"])
def test_every_size_and_colour_parses(shape):
    for colour, side in itertools.product(PALETTE, range(8, 13)):
        for x0, y0 in [(0, 0), (32 - side, 32 - side), (11, 5)]:
            objects = [(colour, shape, x0, y0, side)]
            (found,) = shapes.parse_image(shapes.render(objects))
            assert (found["colour"], found["shape"]) == (colour, shape)
            cx, cy = pixel_centroid(object_mask(objects[0]))
            assert abs(found["cx"] - 0.5 - cx) < 1e-9 and abs(found["cy"] - 0.5 - cy) < 1e-9


def test_noise_and_blank_score_zero():
    prompts = shapes.eval_prompts()
    rng = np.random.default_rng(99)
    noise = rng.integers(0, 256, (1000, 32, 32, 3), dtype=np.uint8)
    captions = [prompts[i % len(prompts)] for i in range(1000)]
    assert shapes.evaluate(captions, noise)["overall"] < 0.01
    blank = shapes.evaluate(captions, np.zeros_like(noise))
    assert blank["overall"] == 0 and all(blank[c] == 0 for c in shapes.CATEGORIES)


def test_scorer_tolerates_light_corruption(scenes):
    rng = np.random.default_rng(5)
    subset = scenes[::10]
    images = np.stack([shapes.render(o) for _, o in subset]).astype(float)
    images += rng.normal(0, 30, images.shape)  # blur-free sensor noise ...
    flip = rng.random(images.shape[:3]) < 0.03  # ... plus 3% of pixels replaced at random
    images[flip] = rng.integers(0, 256, (flip.sum(), 3))
    images = images.clip(0, 255).astype(np.uint8)
    assert shapes.evaluate([c for c, _ in subset], images)["overall"] >= 0.95


def test_perturbations_break_the_right_category():
    rng = np.random.default_rng(11)
    checked = dict(attribution=0, position=0, counting=0)
    while min(checked.values()) < 30:
        caption, objects = shapes.sample_scene(rng)
        form, relation = GRAMMAR[caption]
        if form == "two_objects":
            (c1, s1, *b1), (c2, s2, *b2) = objects
            if c1 == c2 or s1 == s2:
                continue  # swapping colours would change nothing
            swapped = shapes.render([(c2, s1, *b1), (c1, s2, *b2)])
            assert shapes.score(caption, swapped) == {"two_objects": True, "attribution": False}
            checked["attribution"] += 1
        elif form == "position" and relation == "to the left of":
            mirrored = shapes.render(objects)[:, ::-1]
            assert shapes.score(caption, mirrored) == {"position": False}
            checked["position"] += 1
        elif form == "counting":
            assert shapes.score(caption, shapes.render(objects[:-1])) == {"counting": False}
            checked["counting"] += 1


def test_wrong_content_fails():
    image = shapes.render([("red", "circle", 2, 2, 10), ("blue", "square", 18, 18, 10)])
    assert shapes.score("a red circle and a blue square", image) == {
        "two_objects": True, "attribution": True}
    assert shapes.score("a red circle and a blue triangle", image) == {
        "two_objects": False, "attribution": False}
    assert shapes.score("a red circle", image) == {"single": False}
    assert shapes.score("two red circles", image) == {"counting": False}
    assert shapes.score("a red circle above a blue square", image) == {"position": False}
    assert shapes.score("a blue square below a red circle", image) == {"position": False}
    image = shapes.render([("red", "circle", 2, 2, 10), ("blue", "square", 18, 4, 10)])
    assert shapes.score("a red circle to the left of a blue square", image) == {"position": True}
    assert shapes.score("a blue square to the right of a red circle", image) == {"position": True}


def test_eval_prompts():
    prompts = shapes.eval_prompts()
    assert prompts == shapes.eval_prompts() and len(set(prompts)) == len(prompts) >= 300
    forms = [GRAMMAR[p][0] for p in prompts]
    assert {f: forms.count(f) for f in shapes.FORMS} == {
        "single": 21, "counting": 42, "two_objects": 120, "position": 120}
    assert {GRAMMAR[p][1] for p in prompts} == set(RELS) | {None}
    prompts.append("mutating the returned list must not change the next call")
    assert len(shapes.eval_prompts()) == 303
    assert shapes.evaluate(shapes.eval_prompts()[:1], [np.zeros((32, 32, 3), np.uint8)])[
        "n"]["single"] == 1


def test_parse_caption():
    assert shapes.parse_caption("a red circle") == {
        "form": "single", "objects": [("red", "circle")], "relation": None}
    assert shapes.parse_caption("three cyan triangles")["objects"] == [("cyan", "triangle")] * 3
    p = shapes.parse_caption("a white square below a white circle")
    assert p == {"form": "position", "objects": [("white", "square"), ("white", "circle")],
                 "relation": "below"}
    assert shapes.parse_caption("a red circle and a red square")["form"] == "two_objects"
    for bad in ["", "   ", "a red", "a red circles", "two red circle", "four red circles",
                "one red circle", "a purple circle", "a red hexagon", "A red circle",
                "a red circle and a red circle", "a red circle above a red circle",
                "a red circle left of a blue square", "a red circle, a blue square",
                "a red circle and a blue square and a green triangle", None]:
        with pytest.raises(ValueError, match="grammar"):
            shapes.parse_caption(bad)


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"\(32, 32, 3\) uint8"):
        shapes.score("a red circle", np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(32, 32, 3\) uint8"):
        shapes.score("a red circle", np.zeros((3, 32, 32), np.uint8))
    with pytest.raises(ValueError):
        shapes.render([("red", "circle", 25, 0, 8)])
    with pytest.raises(ValueError):
        shapes.render([("purple", "circle", 0, 0, 8)])
    with pytest.raises(ValueError):
        shapes.sample_scene(np.random.default_rng(0), "colours")
    with pytest.raises(ValueError):
        shapes.evaluate(["a red circle"], [])


def test_direction_tells_a_mirrored_layout_from_the_right_one():
    rng = np.random.default_rng(5)
    checked = 0
    for _ in range(60):
        caption, objects = shapes.sample_scene(rng, "position")
        assert shapes.direction(caption, shapes.render(objects)) is True
        twin = shapes.mirrored(caption, objects)
        if twin is None:
            continue
        # the twin layout under the ORIGINAL caption: right objects, right axis, wrong order
        assert shapes.direction(caption, shapes.render(twin[1])) is False
        # ... and the twin caption (relation swapped) describes it
        assert shapes.direction(twin[0], shapes.render(twin[1])) is True
        checked += 1
    assert checked > 40
    assert shapes.direction("a red circle", shapes.render([("red", "circle", 4, 4, 10)])) is None
    assert shapes.evaluate(["a red circle to the left of a blue square"],
                           [shapes.render([("red", "circle", 2, 10, 10), ("blue", "square", 20, 10, 10)])])["direction"] == 1.0
