"""CategoryMap: the forms it is made from, its checks, and how two maps' rows are matched."""
import json

import pytest

from detr_cuda.categories import COCO_CATEGORY_NAMES, CategoryMap, normalise_name


def test_category_map_forms_and_errors(tmp_path):
    stored = {"category_map": {"label_to_category_id": [3, 7], "class_names": ["a", "b"]}}
    assert CategoryMap.from_checkpoint(stored) == CategoryMap([3, 7], ["a", "b"])
    assert CategoryMap.from_checkpoint({"model": {}}) is None
    with pytest.raises(ValueError, match="label_to_category_id"):
        CategoryMap.from_checkpoint({"category_map": {"ids": [3, 7], "names": ["a", "b"]}})
    official = CategoryMap.official_coco()
    assert official.num_labels == 91 and official.label_to_category_id[0] is None
    assert official.class_names[1] == "person" and official.category_names()[90] == "toothbrush"
    assert len(official.category_names()) == 80 == len(COCO_CATEGORY_NAMES)
    with pytest.raises(ValueError, match="2 category ids but 1 class names"):
        CategoryMap([1, 2], ["x"])
    annotations = tmp_path / "instances.json"
    annotations.write_text(json.dumps({"images": [], "categories": [{"id": 5, "name": "blue"}, {"id": 1, "name": "red"}]}))
    assert CategoryMap.from_annotations(annotations) == CategoryMap([1, 5], ["red", "blue"])
    assert CategoryMap.from_checkpoint({"category_map": official.to_dict()}) == official


def test_rows_are_matched_by_name_where_both_sides_have_names():
    file_map = CategoryMap([1, 2, 3], ["person", "traffic light", "car"])
    rows, how = file_map.rows_for(CategoryMap([7, 8, 9], ["CAR", "Traffic_Light", "kite"]))
    assert (rows, how) == ([2, 1, None], "name")
    assert normalise_name("  Traffic-light ") == "traffic light"


def test_rows_are_matched_by_id_where_a_side_has_no_names():
    unnamed = CategoryMap.from_categories([{"id": 4}, {"id": 2}])
    assert not unnamed.has_names and unnamed.class_names == ["2", "4"]
    rows, how = CategoryMap([2, 3, 4], ["a", "b", "c"]).rows_for(unnamed)
    assert (rows, how) == ([0, 2], "id")
    # The official heads' unused rows (no category) never match anything.
    rows, _ = CategoryMap.official_coco().rows_for(CategoryMap([12], ["unused-12"]))
    assert rows == [None]


def test_maps_of_several_data_sets_merge_by_name():
    first = CategoryMap([1, 2, 5], ["cat", "Traffic light", "dog"])
    second = CategoryMap([2, 7, 9], ["DOG", "bird", "traffic_light"])    # overlapping and new names, clashing ids
    merged = CategoryMap.merged([first, second])
    # one class per name, in order of first appearance; "bird" keeps its id 7; first spellings kept
    assert merged == CategoryMap([1, 2, 5, 7], ["cat", "Traffic light", "dog", "bird"])
    assert merged.rows_for(second) == ([2, 3, 1], "name")
    third = CategoryMap([1, 3], ["zebra", "cat"])                        # zebra's id 1 is cat's: the next free id
    assert CategoryMap.merged([first, third]) == CategoryMap([1, 2, 5, 6], ["cat", "Traffic light", "dog", "zebra"])
    assert CategoryMap.merged([first]) == first
    # a data set without names: merged by category id
    unnamed = CategoryMap.from_categories([{"id": 5}, {"id": 8}])
    by_id = CategoryMap.merged([first, unnamed])
    assert by_id.label_to_category_id == [1, 2, 5, 8] and not by_id.has_names
