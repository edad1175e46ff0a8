"""Several data sets as one: training on their concatenation with one category map merged by name,
and evaluation of each against its own ground truth.

Every part keeps its own image ids and category ids (its annotation file's); only the labels it
hands out change, to the merged map's (:meth:`detr_cuda.categories.CategoryMap.merged`). Each
target says which part it came from (``dataset_index``), so evaluation can score every part with
its own file's category ids (:func:`category_ids_for`).
"""
import numpy as np
import torch

from ..categories import CategoryMap
from .coco import LabelledDataset


def category_ids_for(part_categories, model_categories):
    """For each label of ``model_categories`` (what a model's rows mean), the category id of the same
    category in a data set's ``part_categories`` (by name, or by id where a map has no names), or
    None when that data set does not have it."""
    rows, _ = part_categories.rows_for(model_categories)
    return [None if row is None else part_categories.label_to_category_id[row] for row in rows]


class ConcatDetection(LabelledDataset):
    """``parts`` (CocoDetection sets) end to end: entry i of the concatenation, with its ``labels``
    in the merged map and ``target["dataset_index"]`` = its part. The key may be (index, seed) as
    for :class:`detr_cuda.data.coco.CocoDetection` (the training sampler's)."""

    def __init__(self, parts):
        if not parts:
            raise ValueError("ConcatDetection needs at least one data set")
        self.parts = list(parts)
        self.categories = CategoryMap.merged([part.categories for part in self.parts])
        self.offsets = np.cumsum([0] + [len(part) for part in self.parts])       # (P + 1,)
        # part p's label k -> merged label: every category of a part is in the merged map
        self.merged_labels = [torch.as_tensor(self.categories.rows_for(part.categories)[0], dtype=torch.int64)
                              for part in self.parts]

    def __len__(self):
        return int(self.offsets[-1])

    def locate(self, index):
        """(part, index inside it) of entry ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} entries")
        part = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return part, int(index - self.offsets[part])

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        part, local = self.locate(index)
        image, target = self.parts[part][local if seed is None else (local, seed)]
        target["labels"] = self.merged_labels[part][target["labels"]]
        target["dataset_index"] = part
        return image, target

    def summary(self):
        """Each part's summary, then how their categories merged."""
        lines = [part.summary() for part in self.parts]
        lines.append(f"{len(self.parts)} data sets, {len(self)} images, {self.num_classes} classes merged by "
                     f"{'name' if self.categories.has_names else 'category id'}: " + ", ".join(
                         f"{name}({category}) in sets {self.sets_with(label)}"
                         for label, (name, category) in enumerate(zip(self.class_names, self.label_to_category_id))))
        return "\n".join(lines)

    def sets_with(self, label):
        """Indices of the parts that have merged label ``label``, as text ("0,1")."""
        return ",".join(str(p) for p, labels in enumerate(self.merged_labels) if bool((labels == label).any()))
