"""CategoryMap: what each class row of a model means (a dataset category id and its name).

A model scores contiguous labels 0..K-1; a dataset names its categories by
(often sparse) ids and by names. The map is stored in our checkpoints as
``{"label_to_category_id": [...], "class_names": [...]}`` and read back only
through :meth:`CategoryMap.from_checkpoint`. The official Deformable DETR /
DN-DETR COCO releases store no map: their 91 class rows are indexed by COCO
category id itself (:meth:`CategoryMap.official_coco`).

Several data sets train one model through one map merged by name (:meth:`CategoryMap.merged`).
Rows of two maps are matched (:meth:`CategoryMap.rows_for`) by name wherever
both sides name their categories (case and spaces do not matter: "Traffic
Light" is "traffic light"), and by category id only where one side has no
names (a dataset whose categories lack a "name").
"""
import dataclasses
import json
from typing import List, Optional

OFFICIAL_COCO_NUM_CLASSES = 91

# COCO 2017: 80 categories, ids 1..90 with gaps.
COCO_CATEGORY_NAMES = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train", 8: "truck",
    9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign", 14: "parking meter", 15: "bench",
    16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep", 21: "cow", 22: "elephant", 23: "bear",
    24: "zebra", 25: "giraffe", 27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase",
    34: "frisbee", 35: "skis", 36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat",
    40: "baseball glove", 41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle",
    46: "wine glass", 47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple",
    54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza", 60: "donut",
    61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed", 67: "dining table", 70: "toilet",
    72: "tv", 73: "laptop", 74: "mouse", 75: "remote", 76: "keyboard", 77: "cell phone", 78: "microwave",
    79: "oven", 80: "toaster", 81: "sink", 82: "refrigerator", 84: "book", 85: "clock", 86: "vase",
    87: "scissors", 88: "teddy bear", 89: "hair drier", 90: "toothbrush",
}


def normalise_name(name):
    """The form names are compared in: lower case, runs of white space (and _ / -) as one space."""
    return " ".join(str(name).replace("_", " ").replace("-", " ").casefold().split())


@dataclasses.dataclass
class CategoryMap:
    """Model label k -> ``label_to_category_id[k]`` (None for a row that names no category: row 0
    and the ids COCO never uses in the official 91-row heads) and ``class_names[k]``.

    ``has_names`` is False when the names are only the ids written as text (a dataset whose
    categories carry no "name"); such a map is matched by id.
    """
    label_to_category_id: List[Optional[int]]
    class_names: List[str]
    has_names: bool = True

    def __post_init__(self):
        if len(self.label_to_category_id) != len(self.class_names):
            raise ValueError(f"category map: {len(self.label_to_category_id)} category ids but "
                             f"{len(self.class_names)} class names")

    @property
    def num_labels(self):
        return len(self.label_to_category_id)

    def category_names(self):
        """{category id: name} over the labels that name a category."""
        return {cat: name for cat, name in zip(self.label_to_category_id, self.class_names) if cat is not None}

    def describe(self, labels):
        """'name (id 3)' strings for ``labels``, for messages."""
        return [f"{self.class_names[k]} (id {self.label_to_category_id[k]})" for k in labels]

    def to_dict(self):
        """The form stored in checkpoints."""
        return {"label_to_category_id": list(self.label_to_category_id), "class_names": list(self.class_names)}

    # -- makers ------------------------------------------------------------------------------------
    @classmethod
    def from_categories(cls, categories):
        """From a COCO ``categories`` list: labels in the order of sorted ids (as the datasets use)."""
        categories = sorted(categories, key=lambda c: c["id"])
        has_names = all(c.get("name") not in (None, "") for c in categories)
        return cls([int(c["id"]) for c in categories], [str(c.get("name") or c["id"]) for c in categories],
                   has_names)

    @classmethod
    def from_annotations(cls, annotation_file):
        """The categories of an instances JSON file."""
        with open(annotation_file, encoding="utf-8") as handle:
            return cls.from_categories(json.load(handle)["categories"])

    @classmethod
    def official_coco(cls):
        """The 91-row heads of the official COCO releases: row i scores COCO category id i."""
        ids = [i if i in COCO_CATEGORY_NAMES else None for i in range(OFFICIAL_COCO_NUM_CLASSES)]
        names = [COCO_CATEGORY_NAMES.get(i, f"unused-{i}") for i in range(OFFICIAL_COCO_NUM_CLASSES)]
        return cls(ids, names)

    @classmethod
    def from_checkpoint(cls, checkpoint):
        """The map stored in one of our checkpoints (a dict), or None when it holds none."""
        stored = checkpoint.get("category_map") if isinstance(checkpoint, dict) else None
        if stored is None:
            return None
        if not isinstance(stored, dict) or not stored.get("label_to_category_id"):
            raise ValueError("the checkpoint's category_map has no label_to_category_id list")
        ids = [None if i is None else int(i) for i in stored["label_to_category_id"]]
        names = stored.get("class_names") or [str(i) for i in ids]
        return cls(ids, [str(n) for n in names], has_names=bool(stored.get("class_names")))

    @classmethod
    def merged(cls, maps):
        """One map over the categories of several data sets' ``maps``: categories with the same name
        (compared as :func:`normalise_name` does) are one label; by category id instead when a map
        has no names. Labels in order of first appearance (the first map's, then each next map's new
        ones), each named as where it first appeared. A category keeps the id it has there unless an
        earlier one took that id; it then gets the next id above every id of every map."""
        by_name = all(m.has_names for m in maps)
        next_free = 1 + max((c for m in maps for c in m.label_to_category_id if c is not None), default=0)
        keys, ids, names = set(), [], []
        for category_map in maps:
            for category, name in zip(category_map.label_to_category_id, category_map.class_names):
                key = normalise_name(name) if by_name else category
                if category is None or key in keys:
                    continue
                keys.add(key)
                if category in ids:
                    category, next_free = next_free, next_free + 1
                ids.append(category)
                names.append(name)
        return cls(ids, names, has_names=by_name)

    # -- matching ----------------------------------------------------------------------------------
    def rows_for(self, target):
        """For each label of ``target`` (another CategoryMap), the row of this map with the same
        category, or None. By name where both maps have names, else by category id.

        Returns (rows, how) with ``how`` "name" or "id".
        """
        if self.has_names and target.has_names:
            row_of = {}
            for row, (category, name) in enumerate(zip(self.label_to_category_id, self.class_names)):
                if category is not None:
                    row_of.setdefault(normalise_name(name), row)
            return [row_of.get(normalise_name(name)) for name in target.class_names], "name"
        row_of = {category: row for row, category in enumerate(self.label_to_category_id) if category is not None}
        return [row_of.get(category) for category in target.label_to_category_id], "id"
