"""Pascal VOC XML annotations read into a COCO instances dict (for ``data.format=voc`` and
``tools/convert_dataset.py``).

Layout (VOCdevkit/VOC2007)::

    Annotations/000005.xml         <filename>, <size><width><height>, and per <object>: <name>,
                                   <difficult>, <bndbox><xmin><ymin><xmax><ymax>
    JPEGImages/000005.jpg
    ImageSets/Main/train.txt       the ids of a split, one per line

The annotation source is the ``Annotations`` folder (every XML file in it) or a split list (its
ids name ``Annotations/<id>.xml`` two folders up, as in the layout above).

COCO terms: categories are the given names, or else the object names found, sorted, with ids
1..K; image ids from the XML files' names when all are numbers (VOC2007's 000005 -> 5), else 1..N;
``file_name`` as in ``<filename>``. VOC boxes count pixels from 1 and include both ends, so
x = xmin - 1 and w = xmax - xmin + 1 (likewise y, h). Objects marked ``difficult`` become
``iscrowd=1``: left out of training and, as in VOC's own evaluation, neither a hit nor a miss
(pycocotools' "ignore" regions).
"""
import os
import xml.etree.ElementTree as ElementTree

from .folders import image_ids_from_names
from .validate import AnnotationFileError
from .yolo import image_size


def annotation_files(source):
    """XML paths of ``source``: an Annotations folder (sorted) or a split list file (in its order)."""
    if os.path.isdir(source):
        return [os.path.join(source, name) for name in sorted(os.listdir(source)) if name.lower().endswith(".xml")]
    if not os.path.isfile(source):
        raise FileNotFoundError(f"VOC annotations not found: {source} (an Annotations folder or a split list such "
                                "as ImageSets/Main/train.txt)")
    folder = os.path.join(os.path.dirname(os.path.abspath(source)), "..", "..", "Annotations")
    with open(source, encoding="utf-8") as handle:
        ids = [line.split()[0] for line in handle if line.strip()]
    return [os.path.normpath(os.path.join(folder, f"{image_id}.xml")) for image_id in ids]


def _text(element, tag, path):
    found = element.find(tag)
    if found is None or found.text is None or not found.text.strip():
        raise AnnotationFileError(f"{path}: <{tag}> missing or empty")
    return found.text.strip()


def _number(element, tag, path):
    text = _text(element, tag, path)
    try:
        return float(text)
    except ValueError:
        raise AnnotationFileError(f"{path}: <{tag}> is not a number: {text!r}") from None


def parse_voc_xml(path, image_dir=None):
    """One XML file -> (file_name, (width, height), [(name, [x, y, w, h], difficult)]).

    A missing or zero <size> is read from the image in ``image_dir`` (some exporters leave it out)."""
    try:
        root = ElementTree.parse(path).getroot()
    except (ElementTree.ParseError, OSError) as error:
        raise AnnotationFileError(f"{path}: not a readable VOC XML file: {error}") from None
    file_name = _text(root, "filename", path)
    size = root.find("size")
    width, height = (0, 0) if size is None else (int(_number(size, "width", path)), int(_number(size, "height", path)))
    if (width <= 0 or height <= 0) and image_dir is not None:
        width, height = image_size(os.path.join(image_dir, file_name)) or (0, 0)
    objects = []
    for element in root.iter("object"):
        box = element.find("bndbox")
        if box is None:
            raise AnnotationFileError(f"{path}: an <object> without <bndbox>")
        xmin, ymin, xmax, ymax = (_number(box, tag, path) for tag in ("xmin", "ymin", "xmax", "ymax"))
        difficult = element.find("difficult")
        objects.append((_text(element, "name", path), [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1],
                        difficult is not None and (difficult.text or "0").strip() == "1"))
    return file_name, (width, height), objects


def read_voc(source, image_dir=None, names=None):
    """COCO instances dict of the VOC annotations ``source`` (module docstring). ``names``: the class
    names in category order (ids 1..K); objects of other names are an error naming the file."""
    paths = annotation_files(source)
    if not paths:
        raise AnnotationFileError(f"{source}: no VOC XML annotations")
    parsed = {}
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"VOC annotation file not found: {path} (listed by {source})")
        parsed[path] = parse_voc_xml(path, image_dir)
    found = sorted({name for _, _, objects in parsed.values() for name, _, _ in objects})
    names = list(names) if names else found
    category_of = {name: index for index, name in enumerate(names, start=1)}
    images, annotations = [], []
    for path, image_id in image_ids_from_names(paths).items():
        file_name, (width, height), objects = parsed[path]
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for name, box, difficult in objects:
            if name not in category_of:
                raise AnnotationFileError(f"{path}: object name {name!r} is not one of the class names {names}")
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category_of[name],
                                "bbox": box, "area": box[2] * box[3], "iscrowd": int(difficult)})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": index, "name": name} for name, index in category_of.items()]}
