"""A procedurally generated captioned-image dataset: coloured shapes on plain backgrounds.

Every image shows 1-3 copies of one shape in one colour, at one size and position, on one background; its
captions describe those attributes in varied phrasings. Used by the examples and to train the bundled
default model, and small enough to generate on a CPU in seconds:

    from rwkv_clip_hf.shapes import make_shapes_dataset
    train = make_shapes_dataset(2000, seed=0)                  # datasets.Dataset: image, caption, ...

Every shape lies fully inside its image. `scene_size=K` groups rows into scenes of up to K images that differ
in shape only (hard negatives for contrastive batches).

Splits for held-out evaluation: `held_out_pairs(...)` names colour x shape combinations that
`make_shapes_dataset(..., exclude_pairs=...)` leaves out of training and `only_pairs=...` keeps for testing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 50, 170),
    "orange": (240, 140, 30),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
}
BACKGROUNDS = {"white": (250, 250, 250), "gray": (128, 128, 128), "black": (10, 10, 10), "beige": (225, 210, 180)}
SHAPES = ["circle", "square", "triangle", "diamond", "star", "cross"]
SIZES = {"small": 0.2, "large": 0.34}
POSITIONS = {
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "center": (0.5, 0.5),
}
COUNTS = {1: "one", 2: "two", 3: "three"}

# Caption phrasings; `{a}` is "a" or the count word, `{shape}` is plural when count > 1.
TRAIN_TEMPLATES = [
    "{a} {color} {shape}",
    "{a} {size} {color} {shape} on a {background} background",
    "a picture of {a} {color} {shape}",
    "{a} {color} {shape} in the {position}",
    "there {be} {a} {size} {color} {shape} on {background}",
    "{color} {shape} drawn on a {background} canvas",
    "an image showing {a} {color} {shape} near the {position}",
    "{a} {size} {color} {shape}",
]
# Phrasings never used in training, for held-out evaluation of the bundled model.
TEST_TEMPLATES = ["a photo of {a} {color} {shape}.", "this is {a} {color} {shape}."]


def pair_name(color: str, shape: str) -> str:
    """The class name of a colour x shape pair ("red circle"): the classifier labels of
    `finetune_classification.py --shapes_label pair` and the default model's zero-shot classes."""
    return f"{color} {shape}"


def held_out_pairs(fraction: float = 0.2, seed: int = 1234) -> list[tuple[str, str]]:
    """A reproducible set of (colour, shape) pairs to keep out of training; every colour and shape still
    appears in training in other combinations."""
    rng = np.random.default_rng(seed)
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    chosen = []
    for index in rng.permutation(len(pairs)):
        color, shape = pairs[index]
        if sum(c == color for c, _ in chosen) < 2 and sum(s == shape for _, s in chosen) < 3:
            chosen.append((color, shape))
        if len(chosen) >= round(fraction * len(pairs)):
            break
    return sorted(chosen)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)]
    if shape == "star":
        return [
            (
                cx + (r if i % 2 == 0 else r * 0.45) * math.cos(-math.pi / 2 + i * math.pi / 5),
                cy + (r if i % 2 == 0 else r * 0.45) * math.sin(-math.pi / 2 + i * math.pi / 5),
            )
            for i in range(10)
        ]
    if shape == "cross":
        t = r * 0.35
        return [
            (cx - t, cy - r),
            (cx + t, cy - r),
            (cx + t, cy - t),
            (cx + r, cy - t),
            (cx + r, cy + t),
            (cx + t, cy + t),
            (cx + t, cy + r),
            (cx - t, cy + r),
            (cx - t, cy + t),
            (cx - r, cy + t),
            (cx - r, cy - t),
            (cx - t, cy - t),
        ]
    raise ValueError(f"unknown shape {shape!r}")


MARGIN = 1.5  # kept free between every shape and the image border (pixel rounding takes up to half a pixel)
# radius of each of `count` copies, as a fraction of the size's single-shape radius
COUNT_SCALE = {1: 1.0, 2: 0.77, 3: 0.6}


def layout(size, position, count, image_size=64, rng=None) -> tuple[list[tuple[float, float]], float]:
    """Centres and radius of the `count` copies of a scene's shape: a row along the position's long axis
    (vertical for left and right, horizontal otherwise), jittered by `rng` (None: no jitter).

    Every copy lies inside the image and off its outermost pixels (pixel coordinates run from 0 to
    `image_size - 1`, as in PIL): a group that would cross the border is moved inwards, and one that is longer
    than the image is scaled down to fit (only large groups of 2 or 3 are; they stay larger than small ones)."""
    rng = rng or np.random.default_rng(0)
    radius = SIZES[size] * image_size * COUNT_SCALE[count] * rng.uniform(0.85, 1.15)
    px, py = POSITIONS[position]
    horizontal = position in ("top", "bottom", "center")
    # jitter: the whole row moves along its axis, each copy across it (so copies never overlap)
    along, across = rng.uniform(-2, 2), [rng.uniform(-2, 2) for _ in range(count)]
    last = image_size - 1  # the last pixel's coordinate
    # the row's length: (count - 1) spacings of 2.2 radii and one radius at each end
    radius = min(radius, (last - 2 * MARGIN) / (2.2 * (count - 1) + 2), last / 2 - MARGIN - 2)
    centres = []
    for i in range(count):
        offset = (i - (count - 1) / 2) * 2.2 * radius + along
        if horizontal:
            centres.append((px * image_size + offset, py * image_size + across[i]))
        else:
            centres.append((px * image_size + across[i], py * image_size + offset))
    shifts = []
    for axis in (0, 1):
        low = min(c[axis] for c in centres) - radius - MARGIN
        high = max(c[axis] for c in centres) + radius + MARGIN - last
        shifts.append(-low if low < 0 else (-high if high > 0 else 0.0))
    return [(cx + shifts[0], cy + shifts[1]) for cx, cy in centres], radius


def draw(shape, color, size, position, count, background, image_size=64, rng=None, rgb=None) -> Image.Image:
    """Render one image (see `layout` for where the shapes go). `rng` jitters positions and sizes slightly
    (None: no jitter). `rgb` fills the shapes with that colour instead of `COLORS[color]`."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUNDS[background])
    canvas = ImageDraw.Draw(image)
    centres, radius = layout(size, position, count, image_size, rng)
    fill = COLORS[color] if rgb is None else tuple(int(v) for v in rgb)
    for cx, cy in centres:
        if shape == "circle":
            canvas.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
        else:
            canvas.polygon(_polygon(shape, cx, cy, radius), fill=fill)
    return image


def _nearest_color_index(rgb) -> np.ndarray:
    """Index into `COLORS` of the named colour nearest (Euclidean, RGB) to each colour of `rgb` (..., 3)."""
    named = np.asarray(list(COLORS.values()), float)
    return ((np.asarray(rgb, float)[..., None, :] - named) ** 2).sum(axis=-1).argmin(axis=-1)


def nearest_color(rgb) -> str:
    """The name of the colour in `COLORS` nearest to `rgb` (Euclidean distance in RGB)."""
    return list(COLORS)[int(_nearest_color_index(rgb))]


# a random colour must be at least this far (Euclidean, RGB) from the background: the closest named pair,
# white on beige, is 76 apart
MIN_CONTRAST = 70.0


def random_rgb(color: str, background: str, rng) -> tuple[int, int, int]:
    """A uniformly random colour whose nearest named colour (`nearest_color`) is `color` and that stands out
    from `background` by at least `MIN_CONTRAST` (rejection sampling: every colour's share of the RGB cube is
    above 4 % on every background)."""
    if color not in COLORS:
        raise ValueError(f"unknown colour {color!r}; known: {', '.join(COLORS)}")
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; known: {', '.join(BACKGROUNDS)}")
    target = list(COLORS).index(color)
    back = np.asarray(BACKGROUNDS[background], float)
    for _ in range(1000):
        candidates = rng.integers(0, 256, size=(64, 3))
        ok = (_nearest_color_index(candidates) == target) & (np.linalg.norm(candidates - back, axis=1) >= MIN_CONTRAST)
        if ok.any():
            return tuple(int(v) for v in candidates[int(np.argmax(ok))])
    raise RuntimeError(f"found no colour nearest to {color!r} that stands out from a {background} background")


def caption(template: str, shape, color, size, position, count, background) -> str:
    a = "a" if count == 1 else COUNTS[count]
    noun = shape if count == 1 else shape + ("es" if shape.endswith("s") else "s")
    be = "is" if count == 1 else "are"
    text = template.format(a=a, be=be, color=color, shape=noun, size=size, position=position, background=background)
    return text.replace("a orange", "an orange")


def sample_attributes(rng, exclude_pairs: Iterable = (), only_pairs: Iterable | None = None) -> dict:
    exclude = set(map(tuple, exclude_pairs))
    allowed = set(map(tuple, only_pairs)) if only_pairs is not None else None
    while True:
        color, shape = str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))
        if (color, shape) in exclude or (allowed is not None and (color, shape) not in allowed):
            continue
        background = str(rng.choice([b for b in BACKGROUNDS if b != color]))
        return {
            "shape": shape,
            "color": color,
            "size": str(rng.choice(list(SIZES))),
            "position": str(rng.choice(list(POSITIONS))),
            "count": int(rng.choice(list(COUNTS))),
            "background": background,
        }


def scene_variants(
    attributes: dict, scene_size: int, rng, exclude_pairs: Iterable = (), only_pairs: Iterable | None = None
) -> list[dict]:
    """`attributes` and up to `scene_size - 1` copies of it with other shapes (in random order), skipping
    excluded pairs (and, with `only_pairs`, pairs not in it)."""
    exclude = set(map(tuple, exclude_pairs))
    allowed = set(map(tuple, only_pairs)) if only_pairs is not None else None
    scene = [attributes]
    for index in rng.permutation(len(SHAPES)):
        if len(scene) >= scene_size:
            break
        pair = (attributes["color"], SHAPES[index])
        if SHAPES[index] == attributes["shape"] or pair in exclude or (allowed is not None and pair not in allowed):
            continue
        scene.append({**attributes, "shape": SHAPES[index]})
    return scene


def make_shapes_dataset(
    num_samples: int,
    seed: int = 0,
    image_size: int = 64,
    templates: list[str] | None = None,
    captions_per_image: int = 3,
    exclude_pairs: Iterable = (),
    only_pairs: Iterable | None = None,
    scene_size: int = 1,
    random_colors: float = 0.0,
):
    """A `datasets.Dataset` with columns `image` (PIL), `caption` (one phrasing), `captions` (several
    phrasings, for text augmentation), the attributes `shape`, `color`, `size`, `position`, `count`,
    `background`, `label` (the shape index, for classification) and `scene`.

    With `scene_size > 1` the rows come in scenes: up to `scene_size` consecutive rows share colour, size,
    position, count and background and differ in shape only, and share a `scene` id. In one contrastive batch
    they are hard negatives for each other, which teaches shapes faster than random batches (whose captions
    can mostly be told apart by colour alone); `RWKVCLIPTrainer(group_by_column="scene")` keeps scenes
    together. With `scene_size=1`, `scene` is the row index.

    `random_colors=p` draws the shapes of a fraction p of the scenes in a random colour instead of the exact
    `COLORS` value: uniform over the colours whose nearest named colour is the row's `color` (so captions stay
    true, and an excluded pair's colours are never drawn with its shape), at least `MIN_CONTRAST` from the
    background. It breaks the tie between a shape and the few exact colours it comes in, so that a tower
    trained on shapes recognises them in colours it never saw them in. The `rgb` column holds the colour drawn."""
    from datasets import Dataset, Features, Sequence, Value
    from datasets import Image as ImageFeature

    if num_samples <= 0:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    if not 0.0 <= random_colors <= 1.0:
        raise ValueError(f"random_colors is a fraction of the scenes, between 0 and 1; got {random_colors}")
    if not 1 <= scene_size <= len(SHAPES):
        raise ValueError(f"scene_size must be between 1 and {len(SHAPES)} (the number of shapes), got {scene_size}")
    templates = templates or TRAIN_TEMPLATES
    rng = np.random.default_rng(seed)
    columns = (
        "image",
        "caption",
        "captions",
        "shape",
        "color",
        "size",
        "position",
        "count",
        "background",
        "label",
        "scene",
        "rgb",
    )
    rows = {k: [] for k in columns}
    scene = 0
    while len(rows["image"]) < num_samples:
        attributes = sample_attributes(rng, exclude_pairs, only_pairs)
        rgb = COLORS[attributes["color"]]
        # (no random draws at all without random_colors: the datasets it makes stay as they were)
        if random_colors > 0 and rng.random() < random_colors:
            rgb = random_rgb(attributes["color"], attributes["background"], rng)
        for variant in scene_variants(attributes, scene_size, rng, exclude_pairs, only_pairs)[
            : num_samples - len(rows["image"])
        ]:
            image = draw(**variant, image_size=image_size, rng=rng, rgb=rgb)
            chosen = rng.choice(templates, size=captions_per_image, replace=len(templates) < captions_per_image)
            phrasings = [caption(str(t), **variant) for t in chosen]
            rows["image"].append(image)
            rows["caption"].append(phrasings[0])
            rows["captions"].append(phrasings)
            for key, value in variant.items():
                rows[key].append(value)
            rows["label"].append(SHAPES.index(variant["shape"]))
            rows["scene"].append(scene if scene_size > 1 else len(rows["scene"]))
            rows["rgb"].append(list(rgb))
        scene += 1
    features = Features(
        {
            "image": ImageFeature(),
            "caption": Value("string"),
            "captions": Sequence(Value("string")),
            "shape": Value("string"),
            "color": Value("string"),
            "size": Value("string"),
            "position": Value("string"),
            "count": Value("int32"),
            "background": Value("string"),
            "label": Value("int64"),
            "scene": Value("int64"),
            "rgb": Sequence(Value("uint8"), length=3),
        }
    )
    return Dataset.from_dict(rows, features=features)


__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "MIN_CONTRAST",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "TEST_TEMPLATES",
    "TRAIN_TEMPLATES",
    "caption",
    "draw",
    "held_out_pairs",
    "layout",
    "make_shapes_dataset",
    "nearest_color",
    "pair_name",
    "random_rgb",
    "scene_variants",
]
