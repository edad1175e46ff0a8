"""Pictures drawn with PIL's ImageDraw: detection boxes with names and scores, two images side by
side, and deformable-attention sampling points."""
import functools
import itertools
import zlib

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..categories import normalise_name

# One colour per feature level (strides 8, 16, 32, 64): red, green, blue, yellow, then more.
LEVEL_COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (145, 30, 180), (70, 240, 240))
PALETTE_SIZE = 80


@functools.lru_cache(maxsize=1)
def class_palette():
    """PALETTE_SIZE RGB colours, each as far as possible from the ones before it (greedy
    farthest-point picks over the saturated colours of a 6-level RGB grid, starting at red): any two
    differ by at least one grid step (51 in each channel's units) and the first ten by far more, so
    the classes of a small map look nothing alike."""
    levels = range(0, 256, 51)
    candidates = np.array([c for c in itertools.product(levels, repeat=3) if max(c) - min(c) >= 100], dtype=float)
    chosen = [int(np.flatnonzero((candidates == (255, 0, 0)).all(1))[0])]
    nearest = np.linalg.norm(candidates - candidates[chosen[0]], axis=1)
    while len(chosen) < PALETTE_SIZE:
        pick = int(nearest.argmax())  # first of the farthest: deterministic
        chosen.append(pick)
        nearest = np.minimum(nearest, np.linalg.norm(candidates - candidates[pick], axis=1))
    return tuple(tuple(int(v) for v in candidates[i]) for i in chosen)


def colour_for(key):
    """The palette colour of ``key``: an int (a class's position in its category map: classes
    0..79 all differ) or a name (hashed into the palette: stable, but two names may share one)."""
    index = key if isinstance(key, int) else zlib.crc32(str(key).encode("utf-8"))
    palette = class_palette()
    return palette[index % len(palette)]


def shared_colour_indices(model_names, dataset_names=()):
    """{name: palette index} for both maps: the model's classes by position, a dataset name that is
    also a model class (compared as :func:`normalise_name` does) takes that class's colour, the
    others the next free indices. So a class has one colour on both sides of a comparison."""
    indices = {}
    for name in model_names:
        indices.setdefault(normalise_name(name), len(indices))
    colours = {name: indices[normalise_name(name)] for name in model_names}
    for name in dataset_names:
        colours[name] = indices.setdefault(normalise_name(name), len(indices))
    return colours


def _font(image):
    size = max(10, min(image.size) // 40)
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _label(draw, xy, text, colour, font, image_size, above=True):
    """Text on a filled box at ``xy``, kept inside the image: above ``xy`` (a box's label, when there
    is room) or, with ``above`` False, with its top-left at ``xy``."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    width, height = right - left + 4, bottom - top + 4
    x = min(max(0, xy[0]), max(0, image_size[0] - width))
    y = xy[1] - height if above and xy[1] - height >= 0 else xy[1]
    y = min(max(0, y), max(0, image_size[1] - height))
    draw.rectangle([x, y, x + width, y + height], fill=colour)
    draw.text((x + 2 - left, y + 2 - top), text, fill=(0, 0, 0) if sum(colour) > 450 else (255, 255, 255), font=font)


def draw_detections(image, boxes, names, scores=None, width=None, colour_keys=None):
    """Copy of the RGB ``image`` with boxes (k, 4) absolute xyxy (tensor or list), their ``names``
    (k strings) and ``scores`` (k,) or None (ground truth: names only). ``colour_keys``: k class
    indices for :func:`colour_for` (default: the names, hashed)."""
    picture = image.convert("RGB")
    draw = ImageDraw.Draw(picture)
    font = _font(picture)
    line = width or max(2, min(picture.size) // 200)
    boxes = boxes.tolist() if hasattr(boxes, "tolist") else list(boxes)
    scores = scores.tolist() if hasattr(scores, "tolist") else scores
    colour_keys = list(names) if colour_keys is None else list(colour_keys)
    for index, (box, name) in enumerate(zip(boxes, names)):
        colour = colour_for(colour_keys[index])
        draw.rectangle([box[0], box[1], box[2], box[3]], outline=colour, width=line)
        text = name if scores is None else f"{name} {scores[index]:.2f}"
        _label(draw, (box[0], box[1]), text, colour, font, picture.size)
    return picture


def side_by_side(left, right, left_title="ground truth", right_title="predictions", gap=8):
    """Two images next to each other on a white canvas with a title over each."""
    font = _font(left)
    title_height = font.getbbox("Ag")[3] + 8
    width = left.width + gap + right.width
    height = max(left.height, right.height) + title_height
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    canvas.paste(left.convert("RGB"), (0, title_height))
    canvas.paste(right.convert("RGB"), (left.width + gap, title_height))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), left_title, fill=(0, 0, 0), font=font)
    draw.text((left.width + gap + 4, 4), right_title, fill=(0, 0, 0), font=font)
    return canvas


def draw_sampling_points(image, points_per_level, weights_per_level=None, reference_point=None, box=None,
                         title=None):
    """Copy of ``image`` with the sampling points of one query.

    points_per_level: list over levels of (N_l, 2) pixel (x, y) (N_l = heads * points);
    weights_per_level: matching (N_l,) attention weights or None; a point's radius grows
    with its weight. One colour per level (LEVEL_COLOURS). reference_point: (x, y) pixels,
    drawn as a white cross; box: xyxy drawn in white. Points outside the image are not drawn.
    The title and the level legend go in a band below the image (:func:`with_legend_band`).
    """
    picture = image.convert("RGB")
    draw = ImageDraw.Draw(picture)
    base = max(2.0, min(picture.size) / 150)
    if box is not None:
        draw.rectangle(list(box), outline=(255, 255, 255), width=max(1, int(base / 2)))
    for level, points in enumerate(points_per_level):
        colour = LEVEL_COLOURS[level % len(LEVEL_COLOURS)]
        weights = None if weights_per_level is None else weights_per_level[level]
        peak = float(max(weights)) if weights is not None and len(weights) else 1.0
        for index, (x, y) in enumerate(points.tolist() if hasattr(points, "tolist") else points):
            if not (0 <= x < picture.width and 0 <= y < picture.height):
                continue
            radius = base if weights is None else base * (0.5 + 1.5 * float(weights[index]) / max(peak, 1e-12))
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour, outline=(0, 0, 0))
    if reference_point is not None:
        x, y = reference_point
        arm = 3 * base
        for colour, width in (((0, 0, 0), max(3, int(base))), ((255, 255, 255), max(1, int(base / 2)))):
            draw.line([x - arm, y, x + arm, y], fill=colour, width=width)
            draw.line([x, y - arm, x, y + arm], fill=colour, width=width)
    return with_legend_band(picture, title, [(f"level {level}", LEVEL_COLOURS[level % len(LEVEL_COLOURS)])
                                             for level in range(len(points_per_level))])


def with_legend_band(picture, title, entries, margin=4):
    """``picture`` on a canvas with a white band below it holding ``title`` (word-wrapped) and the
    (text, colour) ``entries`` as chips, wrapped to the picture's width. The band never covers the
    picture, however small it is; pixel (x, y) of the picture stays at (x, y)."""
    font = _font(picture)
    text_width = lambda text: font.getbbox(text)[2] - font.getbbox(text)[0]  # noqa: E731
    top, bottom = font.getbbox("Ag")[1], font.getbbox("Ag")[3]
    line_height = bottom - top + 4 + margin
    lines = []
    for word in (title or "").split():
        if lines and text_width(lines[-1] + " " + word) <= picture.width - 2 * margin:
            lines[-1] += " " + word
        else:
            lines.append(word)
    chips, x, row = [], margin, len(lines)
    for text, colour in entries:
        width = text_width(text) + 4
        if x > margin and x + width > picture.width - margin:
            x, row = margin, row + 1
        chips.append((x, row, text, colour))
        x += width + margin
    rows = row + 1 if entries else len(lines)
    canvas = Image.new("RGB", (picture.width, picture.height + rows * line_height + margin), (255, 255, 255))
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for row, line in enumerate(lines):
        draw.text((margin, picture.height + margin + row * line_height + 2 - top), line, fill=(0, 0, 0), font=font)
    for x, row, text, colour in chips:
        _label(draw, (x, picture.height + margin + row * line_height), text, colour, font, canvas.size, above=False)
    return canvas
