"""The generated shapes dataset: shapes inside the image, sizes that stay distinguishable, hard-negative scenes."""

import numpy as np
import pytest

from rwkv_clip_hf.shapes import (
    BACKGROUNDS,
    COLORS,
    COUNTS,
    MIN_CONTRAST,
    POSITIONS,
    SHAPES,
    SIZES,
    draw,
    held_out_pairs,
    layout,
    make_shapes_dataset,
    nearest_color,
    random_rgb,
    sample_attributes,
)


@pytest.mark.parametrize("image_size", [32, 64, 96])
def test_no_shape_touches_the_border(image_size):
    # read from the pixels, not from `layout`: the image's outermost frame shows only the background
    rng = np.random.default_rng(0)
    for _ in range(400):
        attributes = sample_attributes(rng)
        image = np.asarray(draw(**attributes, image_size=image_size, rng=rng))
        frame = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        background = np.array(BACKGROUNDS[attributes["background"]])
        assert (frame == background).all(), attributes


def test_every_combination_is_laid_out_inside_the_image():
    for size in SIZES:
        for position in POSITIONS:
            for count in COUNTS:
                rng = np.random.default_rng(1)
                for _ in range(20):
                    centres, radius = layout(size, position, count, 64, rng)
                    assert len(centres) == count and radius > 4
                    for cx, cy in centres:
                        assert (
                            1 + radius <= cx + 1e-9
                            and cx + radius <= 62 + 1e-9
                            and 1 + radius <= cy + 1e-9
                            and cy + radius <= 62 + 1e-9
                        )
                    # the copies do not overlap
                    for i in range(count - 1):
                        gap = np.hypot(centres[i + 1][0] - centres[i][0], centres[i + 1][1] - centres[i][1])
                        assert gap > 2 * radius


@pytest.mark.parametrize("count", list(COUNTS))
def test_large_stays_larger_than_small(count):
    # fitting a row into the image shrinks only large groups; "large" must still mean larger on average
    def mean_radius(size):
        rng = np.random.default_rng(2)
        return np.mean([layout(size, p, count, 64, rng)[1] for p in POSITIONS for _ in range(40)])

    assert mean_radius("large") > 1.15 * mean_radius("small")


def test_scenes_differ_in_shape_only():
    held_out = held_out_pairs()
    data = make_shapes_dataset(200, seed=3, scene_size=6, exclude_pairs=held_out)
    assert len(data) == 200
    rows = data.remove_columns(["image"]).to_list()
    scenes = {}
    for index, row in enumerate(rows):
        scenes.setdefault(row["scene"], []).append(index)
        assert (row["color"], row["shape"]) not in held_out
        assert row["label"] == SHAPES.index(row["shape"])
        assert row["color"] in row["caption"]
    sizes = []
    for members in scenes.values():
        assert members == list(range(members[0], members[-1] + 1))  # consecutive rows
        shapes = [rows[i]["shape"] for i in members]
        assert len(set(shapes)) == len(shapes)
        for key in ("color", "size", "position", "count", "background"):
            assert len({rows[i][key] for i in members}) == 1, key
        sizes.append(len(members))
    # a colour with held-out shapes has fewer than 6 allowed shapes; only the last scene may be cut short
    allowed = {c: sum((c, s) not in held_out for s in SHAPES) for c in {r["color"] for r in rows}}
    for scene, members in list(scenes.items())[:-1]:
        assert len(members) == allowed[rows[members[0]]["color"]]


def test_scene_size_one_is_one_row_per_scene_and_bad_sizes_are_refused():
    data = make_shapes_dataset(10, seed=0)
    assert list(data["scene"]) == list(range(10))
    for bad in (0, len(SHAPES) + 1):
        with pytest.raises(ValueError, match="scene_size"):
            make_shapes_dataset(10, scene_size=bad)


def test_only_pairs_limits_scene_variants():
    pairs = [("red", "circle"), ("red", "star")]
    data = make_shapes_dataset(30, seed=0, scene_size=6, only_pairs=pairs)
    assert set(zip(data["color"], data["shape"])) == set(pairs)


def _nearest_by_hand(rgb):
    # the name whose exact colour is closest, written out independently of nearest_color
    best = None
    for name, value in COLORS.items():
        distance = sum((a - b) ** 2 for a, b in zip(rgb, value))
        if best is None or distance < best[0]:
            best = (distance, name)
    return best[1]


def test_random_colors_stay_in_their_name_and_apart_from_the_background():
    held_out = held_out_pairs()
    data = make_shapes_dataset(300, seed=5, scene_size=3, exclude_pairs=held_out, random_colors=1.0)
    rows = list(data)  # decoded: PIL images
    drawn = set()
    for row in rows:
        rgb = tuple(row["rgb"])
        drawn.add(rgb)
        assert _nearest_by_hand(rgb) == nearest_color(rgb) == row["color"]
        assert (row["color"], row["shape"]) not in held_out
        assert np.linalg.norm(np.subtract(rgb, BACKGROUNDS[row["background"]])) >= MIN_CONTRAST
        pixels = np.asarray(row["image"].convert("RGB")).reshape(-1, 3)
        assert (pixels == rgb).all(axis=1).any(), "the shape is drawn in the row's rgb"
    assert len(drawn) > 0.9 * len({r["scene"] for r in rows})  # random colours, not the named ones
    # a scene shares its colour, as it shares every attribute but the shape
    for scene in {r["scene"] for r in rows}:
        assert len({tuple(r["rgb"]) for r in rows if r["scene"] == scene}) == 1


def test_random_colors_fraction_and_default():
    plain = make_shapes_dataset(40, seed=2)
    assert all(tuple(r) == COLORS[c] for r, c in zip(plain["rgb"], plain["color"]))
    half = make_shapes_dataset(400, seed=2, random_colors=0.5)
    named = sum(tuple(r) == COLORS[c] for r, c in zip(half["rgb"], half["color"]))
    assert 0.35 * 400 < named < 0.65 * 400
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="random_colors"):
            make_shapes_dataset(10, random_colors=bad)


def test_random_rgb_refuses_unknown_names():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown colour 'teal'"):
        random_rgb("teal", "white", rng)
    with pytest.raises(ValueError, match="unknown background 'pink'"):
        random_rgb("red", "pink", rng)
