"""Pictures drawn with PIL's ImageDraw: detection boxes with names and scores, two images side by
side, and deformable-attention sampling points."""
import colorsys

from PIL import Image, ImageDraw, ImageFont

# One colour per feature level (strides 8, 16, 32, 64): red, green, blue, yellow, then more.
LEVEL_COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (145, 30, 180), (70, 240, 240))


def colour_for(key):
    """A bright colour that depends only on ``key`` (a class name or id): golden-ratio hue steps."""
    index = key if isinstance(key, int) else sum(ord(c) * 31 ** i for i, c in enumerate(str(key)))
    hue = (index * 0.618033988749895) % 1.0
    red, green, blue = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(red * 255), int(green * 255), int(blue * 255)


def _font(image):
    size = max(10, min(image.size) // 40)
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _label(draw, xy, text, colour, font, image_size):
    """Text on a filled box whose top-left is ``xy``, kept inside the image."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    width, height = right - left + 4, bottom - top + 4
    x = min(max(0, xy[0]), max(0, image_size[0] - width))
    y = xy[1] - height if xy[1] - height >= 0 else xy[1]
    y = min(max(0, y), max(0, image_size[1] - height))
    draw.rectangle([x, y, x + width, y + height], fill=colour)
    draw.text((x + 2 - left, y + 2 - top), text, fill=(0, 0, 0) if sum(colour) > 450 else (255, 255, 255), font=font)


def draw_detections(image, boxes, names, scores=None, width=None):
    """Copy of the RGB ``image`` with boxes (k, 4) absolute xyxy (tensor or list), their ``names``
    (k strings, coloured by name) and ``scores`` (k,) or None (ground truth: names only)."""
    picture = image.convert("RGB")
    draw = ImageDraw.Draw(picture)
    font = _font(picture)
    line = width or max(2, min(picture.size) // 200)
    boxes = boxes.tolist() if hasattr(boxes, "tolist") else list(boxes)
    scores = scores.tolist() if hasattr(scores, "tolist") else scores
    for index, (box, name) in enumerate(zip(boxes, names)):
        colour = colour_for(name)
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
    font = _font(picture)
    line_height = font.getbbox("Ag")[3] + 6
    if title:
        _label(draw, (4, line_height), title, (255, 255, 255), font, picture.size)
    for level in range(len(points_per_level)):
        # _label puts the text above its anchor when there is room: anchor one line further down.
        _label(draw, (4, (level + 2 + bool(title)) * line_height), f"level {level}",
               LEVEL_COLOURS[level % len(LEVEL_COLOURS)], font, picture.size)
    return picture
