"""A small object-detection set made here: filled squares and discs on noisy backgrounds, with their boxes and
outlines (COCO polygons), written as a COCO folder (images + ``annotations.json``) that ``finetune_detection.py`` and
``finetune_instance_segmentation.py`` read like any COCO export.

Each image holds one to three shapes of random colour and size that do not overlap; the boxes are exact (the
shapes are drawn inside them). Seeded: the same arguments give the same files.
"""

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES = ["square", "disc"]


def draw_image(rng, size, max_objects=3):
    """(an RGB PIL image of ``size`` x ``size``, its objects as (category index, [x, y, width, height]))."""
    background = rng.integers(0, 256, 3)
    noise = rng.normal(0, 20, (size, size, 3))
    image = Image.fromarray(np.clip(background + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    objects, taken = [], []
    for _ in range(rng.integers(1, max_objects + 1)):
        side = int(rng.integers(size // 5, size // 2))
        x, y = (int(v) for v in rng.integers(0, size - side, 2))
        if any(x < bx + bw and bx < x + side and y < by + bh and by < y + side for bx, by, bw, bh in taken):
            continue  # no overlaps: every box shows its whole shape
        category = int(rng.integers(len(CATEGORIES)))
        colour = tuple(int(c) for c in (background + 128 + rng.integers(-40, 40, 3)) % 256)  # far from the background
        shape = draw.rectangle if CATEGORIES[category] == "square" else draw.ellipse
        shape([x, y, x + side - 1, y + side - 1], fill=colour)
        taken.append((x, y, side, side))
        objects.append((category, [x, y, side, side]))
    return image, objects


def outline(category, box, corners=32):
    """The shape drawn in ``box`` ([x, y, width, height]) as a COCO polygon [x1, y1, x2, y2, ...]: the square's
    corners, or ``corners`` points on the disc's circle."""
    x, y, width, height = box
    if category == "square":
        points = [(x, y), (x + width, y), (x + width, y + height), (x, y + height)]
    else:
        angles = np.linspace(0, 2 * np.pi, corners, endpoint=False)
        points = zip(x + width / 2 * (1 + np.cos(angles)), y + height / 2 * (1 + np.sin(angles)))
    return [round(float(v), 2) for point in points for v in point]


def write_coco_folder(folder, count, size=96, seed=0):
    """``count`` images in ``folder/images/`` and their boxes in ``folder/annotations.json`` (COCO); returns the
    folder."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    coco = {"images": [], "annotations": [],
            "categories": [{"id": index + 1, "name": name} for index, name in enumerate(CATEGORIES)]}
    for image_id in range(count):
        image, objects = draw_image(rng, size)
        name = f"{image_id:05d}.png"
        image.save(folder / "images" / name)
        coco["images"].append({"id": image_id, "file_name": name, "width": size, "height": size})
        for category, box in objects:
            coco["annotations"].append({"id": len(coco["annotations"]), "image_id": image_id, "category_id": category + 1,
                                        "bbox": box, "area": box[2] * box[3], "iscrowd": 0,
                                        "segmentation": [outline(CATEGORIES[category], box)]})
    (folder / "annotations.json").write_text(json.dumps(coco))
    return folder
