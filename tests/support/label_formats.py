"""Small YOLO and Pascal VOC data sets written by the tests, with known pixel boxes, and helpers that
check what readers and converters make of them."""
import copy

from PIL import Image

from detr_cuda.data.coco import coco_from_dict
from detr_cuda.data.coco_eval import evaluate_coco

NAMES = ["cat", "dog", "bird"]
# file name -> (width, height, [(class index, [x, y, w, h] pixels)])
PICTURES = {
    "000007.png": (64, 48, [(0, [4, 6, 20, 10]), (2, [30, 20, 30, 28])]),
    "000012.png": (50, 50, [(1, [0, 0, 50, 25])]),
    "000020.png": (80, 60, []),                      # no label file: no objects
}


def write_images(folder):
    folder.mkdir(parents=True)
    for name, (width, height, _) in PICTURES.items():
        Image.new("RGB", (width, height), (90, 120, 150)).save(folder / name)


def write_yolo(root):
    """root/images/train, root/labels/train (one box as a polygon), root/data.yaml."""
    write_images(root / "images" / "train")
    (root / "labels" / "train").mkdir(parents=True)
    for name, (width, height, objects) in PICTURES.items():
        if not objects:
            continue
        lines = []
        for number, (class_index, (x, y, w, h)) in enumerate(objects):
            if number == 1:  # a segmentation polygon (a triangle spanning the box)
                lines.append(f"{class_index} {x / width} {y / height} {(x + w) / width} {(y + h / 2) / height} "
                             f"{(x + w / 3) / width} {(y + h) / height}")
            else:
                lines.append(f"{class_index} {(x + w / 2) / width} {(y + h / 2) / height} {w / width} {h / height}")
        (root / "labels" / "train" / name.replace(".png", ".txt")).write_text("\n".join(lines) + "\n")
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nnames:\n  0: cat\n  1: dog\n  2: bird\n")
    return str(root / "images" / "train"), str(root / "data.yaml")


def write_voc(root):
    """VOC2007-style: Annotations/*.xml (1-based inclusive pixels; one difficult object, one file without
    <size>), JPEGImages/, ImageSets/Main/train.txt."""
    write_images(root / "JPEGImages")
    (root / "Annotations").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for number, (name, (width, height, objects)) in enumerate(PICTURES.items()):
        size = "" if number == 1 else f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"
        xml_objects = "".join(
            f"<object><name>{NAMES[c]}</name><difficult>{int(number == 0 and k == 1)}</difficult><bndbox>"
            f"<xmin>{x + 1}</xmin><ymin>{y + 1}</ymin><xmax>{x + w}</xmax><ymax>{y + h}</ymax></bndbox></object>"
            for k, (c, (x, y, w, h)) in enumerate(objects))
        (root / "Annotations" / name.replace(".png", ".xml")).write_text(
            f"<annotation><filename>{name}</filename>{size}{xml_objects}</annotation>")
    (root / "ImageSets" / "Main" / "train.txt").write_text("".join(n.replace(".png", "\n") for n in PICTURES))
    return root


def expected_boxes(category_id_of):
    """{(image id, category id, (x, y, w, h))} of PICTURES."""
    return {(int(name[:6]), category_id_of(c), tuple(map(float, box)))
            for name, (_, _, objects) in PICTURES.items() for c, box in objects}


def boxes_of(coco_dict):
    """The annotations as expected_boxes gives them, pixel values rounded to 1e-4 (YOLO's fractions)."""
    return {(a["image_id"], a["category_id"], tuple(round(v, 4) + 0.0 for v in a["bbox"]))
            for a in coco_dict["annotations"]}


def ground_truth_ap(coco_dict):
    """AP of the ground truth fed back as detections (crowd / difficult regions left out)."""
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in coco_dict["annotations"] if not a.get("iscrowd")]
    ground_truth = coco_from_dict(copy.deepcopy(coco_dict))  # pycocotools marks up the annotations it reads
    return evaluate_coco(ground_truth, results, [i["id"] for i in coco_dict["images"]])["metrics"]["AP"]
