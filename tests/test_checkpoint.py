"""detr_cuda.checkpoint: the one safe loader, atomic writes, weights into models, class rows by category."""
import argparse
import fractions
import os

import pytest
import torch
from torch import nn

from detr_cuda import checkpoint as ckpt_io
from detr_cuda.categories import CategoryMap, COCO_CATEGORY_NAMES
from detr_cuda.models import build_model
from tests.support.configs import DINO, VARIANTS, tiny_model_config
from tests.support.models import padded_batch
from tests.support.pickles import Payload
from tests.support.official_layouts import official_dino_file

COCO_IDS = sorted(COCO_CATEGORY_NAMES)


class Named(nn.Module):
    """Parameter names shaped like the detector's."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.backbone = nn.ModuleList([nn.Linear(2, 2)])  # backbone.0.*
        self.class_embed = nn.ModuleList([nn.Linear(2, num_classes), nn.Linear(2, num_classes)])
        self.head = nn.Linear(2, 2)


def categories(ids, names=None):
    return CategoryMap(list(ids), list(names) if names is not None else [COCO_CATEGORY_NAMES[i] for i in ids])


def our_checkpoint(model, category_map, path):
    torch.save({"format": ckpt_io.FORMAT, "model": model.state_dict(), "epoch": 0,
                "category_map": category_map.to_dict()}, path)


# -- loading files -----------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["multi_scale", "two_stage"])
def test_round_trip_gives_identical_outputs(tmp_path, variant):
    cfg = tiny_model_config(*VARIANTS[variant])
    torch.manual_seed(0)
    model, _, _ = build_model(cfg, 4)
    torch.manual_seed(1)
    fresh, _, _ = build_model(cfg, 4)
    model.eval()
    fresh.eval()
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "epoch": 3}, path)
    images, mask = padded_batch([(64, 96), (80, 64)])
    assert not torch.equal(model(images, mask)["pred_logits"], fresh(images, mask)["pred_logits"])
    report = ckpt_io.load_for_inference(fresh, path)
    assert report.missing == report.unused == report.mismatched == report.fresh == []
    expected, loaded = model(images, mask), fresh(images, mask)
    assert torch.equal(expected["pred_logits"], loaded["pred_logits"])
    assert torch.equal(expected["pred_boxes"], loaded["pred_boxes"])


def test_official_style_checkpoint_loads(tmp_path):
    """A dict like the released files: 'model' with DDP prefixes, pickled argparse args, profiler keys."""
    cfg = tiny_model_config(*VARIANTS["box_refine"])
    torch.manual_seed(0)
    model, _, _ = build_model(cfg, 4)
    state = {"module." + k: v for k, v in model.state_dict().items()}
    state["module.total_ops"] = torch.zeros(1)
    # Files that hold only one copy of the duplicated decoder head keys still load.
    for key in [k for k in state if k.startswith("module.transformer.decoder.bbox_embed.")]:
        del state[key]
    checkpoint = {"model": state, "optimizer": {}, "lr_scheduler": {}, "epoch": 49,
                  "args": argparse.Namespace(lr=2e-4, with_box_refine=True, lr_drop_epochs=None)}
    path = tmp_path / "official.pth"
    torch.save(checkpoint, path)
    torch.manual_seed(1)
    fresh, _, _ = build_model(cfg, 4)
    ckpt_io.load_for_inference(fresh, path)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_a_file_whose_pickle_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "args": Payload(marker)}, path)
    with pytest.raises(ckpt_io.CheckpointError) as error:
        ckpt_io.load_file(path)
    assert not marker.exists()
    assert str(path) in str(error.value) and "system" in str(error.value)
    assert "could run code" in str(error.value)
    # Any other class is refused the same way; argparse.Namespace (the official releases' args) is allowed.
    torch.save({"model": {}, "args": fractions.Fraction(1, 3)}, path)
    with pytest.raises(ckpt_io.CheckpointError, match="fractions.Fraction"):
        ckpt_io.load_file(path)


def test_a_truncated_file_is_a_clear_error(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save({"model": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ckpt_io.CheckpointError, match=f"cannot read checkpoint {path}"):
        ckpt_io.load_file(path)


def test_weights_that_do_not_fit_are_named(tmp_path):
    torch.manual_seed(0)
    model, _, _ = build_model(tiny_model_config(), 4)
    state = model.state_dict()
    del state["query_embed.weight"]
    state["extra.weight"] = torch.zeros(1)
    state["input_proj.0.0.weight"] = torch.zeros(3, 3, 1, 1)
    report = ckpt_io.load_weights(model, {"model": state})
    assert report.missing == ["query_embed.weight"] and report.unused == ["extra.weight"]
    assert report.mismatched == ["input_proj.0.0.weight: file (3, 3, 1, 1) vs model (64, 128, 1, 1)"]
    with pytest.raises(ckpt_io.WeightsMismatch, match=r"(?s)query_embed\.weight.*input_proj\.0\.0\.weight"):
        ckpt_io.load_for_inference(model, {"model": state})


def test_atomic_save_keeps_the_old_file_when_a_write_fails(tmp_path):
    path = tmp_path / "checkpoint_last.pth"
    ckpt_io.save_atomic({"step": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full (simulated)")

    with pytest.raises(RuntimeError, match="disk full"):
        ckpt_io.save_atomic({"step": 2, "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert os.listdir(tmp_path) == ["checkpoint_last.pth"]  # no temporary file left behind


def test_temporaries_of_killed_writes_are_removed(tmp_path):
    (tmp_path / "checkpoint_last.pth").write_bytes(b"good")
    (tmp_path / "checkpoint_last.pth.k2j_x9.tmp").write_bytes(b"half")
    (tmp_path / "checkpoint_best.pth.abc.tmp").write_bytes(b"half")
    (tmp_path / "notes.tmp").write_bytes(b"mine")
    removed = ckpt_io.remove_stale_temporaries(tmp_path)
    assert sorted(os.path.basename(p) for p in removed) == ["checkpoint_best.pth.abc.tmp",
                                                             "checkpoint_last.pth.k2j_x9.tmp"]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_last.pth", "notes.tmp"]


def test_aliased_head_keys_are_filled(tmp_path):
    class Refine(nn.Module):
        def __init__(self):
            super().__init__()
            self.bbox_embed = nn.ModuleList([nn.Linear(2, 4)])
            self.transformer = nn.Module()
            self.transformer.decoder = nn.Module()
            self.transformer.decoder.bbox_embed = self.bbox_embed  # shared, as with box refinement

    source = Refine()
    torch.save({"model": {k: v for k, v in source.state_dict().items() if k.startswith("bbox_embed")}},
               tmp_path / "heads_once.pth")
    target = Refine()
    report = ckpt_io.load_weights(target, tmp_path / "heads_once.pth")
    assert report.missing == [] and torch.equal(target.bbox_embed[0].weight, source.bbox_embed[0].weight)


# -- class rows by category ------------------------------------------------------------------------------
def test_official_91_row_head_is_picked_by_category_name(tmp_path):
    source = Named(num_classes=91)
    torch.save({"model": {"module." + k: v for k, v in source.state_dict().items()}, "epoch": 49},
               tmp_path / "official_like.pth")
    target = Named(num_classes=3)
    report = ckpt_io.load_weights(target, tmp_path / "official_like.pth", categories([1, 5, 90]))
    assert torch.equal(target.head.weight, source.head.weight)               # 'module.' prefix stripped
    assert torch.equal(target.class_embed[1].weight, source.class_embed[1].weight[[1, 5, 90]])
    assert torch.equal(target.class_embed[1].bias, source.class_embed[1].bias[[1, 5, 90]])
    assert report.matched_by == "name" and "class_embed.1.bias" in report.mapped
    assert report.categories_without_row == []

    # Without categories (and with another head size) the rows cannot be matched: fresh, and said so.
    plain = Named(num_classes=3)
    fresh_head = plain.class_embed[0].weight.detach().clone()
    report = ckpt_io.load_weights(plain, tmp_path / "official_like.pth")
    assert torch.equal(plain.class_embed[0].weight, fresh_head)
    assert "class_embed.0.weight" in report.fresh


def test_renamed_categories_are_not_scored_by_coco_rows(tmp_path):
    """Categories 1..4 named circle, square, triangle, cross: not person, bicycle, car, motorcycle."""
    source = Named(num_classes=91)
    torch.save({"model": source.state_dict()}, tmp_path / "coco.pth")
    shapes = CategoryMap([1, 2, 3, 4], ["circle", "square", "triangle", "cross"])
    target = Named(num_classes=4)
    fresh_head = target.class_embed[0].weight.detach().clone()
    report = ckpt_io.load_weights(target, tmp_path / "coco.pth", shapes)
    assert torch.equal(target.class_embed[0].weight, fresh_head)
    assert report.categories_without_row == ["circle (id 1)", "square (id 2)", "triangle (id 3)", "cross (id 4)"]
    assert any("circle (id 1)" in line for line in report.problems_for_inference())
    with pytest.raises(ckpt_io.WeightsMismatch, match=r"4 categories with no trained class row.*circle"):
        ckpt_io.load_for_inference(Named(num_classes=4), tmp_path / "coco.pth", shapes)


def test_our_checkpoints_keep_each_class_row_on_its_category(tmp_path):
    # An 80-class run fine-tuned on person, bicycle, car: row k comes from the file's row of that category.
    source = Named(num_classes=80)
    our_checkpoint(source, categories(COCO_IDS), tmp_path / "coco80.pth")
    target = Named(num_classes=3)
    report = ckpt_io.load_weights(target, tmp_path / "coco80.pth", categories([1, 2, 3]))
    for layer in range(2):
        assert torch.equal(target.class_embed[layer].weight, source.class_embed[layer].weight[[0, 1, 2]])
        assert torch.equal(target.class_embed[layer].bias, source.class_embed[layer].bias[[0, 1, 2]])
    assert report.mapped == ["class_embed.0.weight", "class_embed.0.bias", "class_embed.1.weight",
                             "class_embed.1.bias"]
    assert report.categories_without_row == [] and report.file_categories.num_labels == 80

    # Same head size, other order and one new category: by name (case and spaces aside); the new one is fresh.
    three = CategoryMap([1, 2, 3], ["Person", "bicycle", "car"])
    our_checkpoint(target, three, tmp_path / "three.pth")
    subset = Named(num_classes=3)
    fresh = subset.class_embed[0].weight.detach().clone()
    wanted = CategoryMap([10, 20, 30], ["car", " person ", "kite"])
    report = ckpt_io.load_weights(subset, tmp_path / "three.pth", wanted)
    assert torch.equal(subset.class_embed[0].weight[0], target.class_embed[0].weight[2])
    assert torch.equal(subset.class_embed[0].weight[1], target.class_embed[0].weight[0])
    assert torch.equal(subset.class_embed[0].weight[2], fresh[2])
    assert report.matched_by == "name" and report.categories_without_row == ["kite (id 30)"]


def test_ids_decide_only_where_a_side_has_no_names(tmp_path):
    source = Named(num_classes=3)
    our_checkpoint(source, CategoryMap([3, 7, 9], ["a", "b", "c"]), tmp_path / "named.pth")
    unnamed = CategoryMap.from_categories([{"id": 9}, {"id": 3}])  # a dataset without category names
    target = Named(num_classes=2)
    report = ckpt_io.load_weights(target, tmp_path / "named.pth", unnamed)
    assert report.matched_by == "id"
    assert torch.equal(target.class_embed[0].weight, source.class_embed[0].weight[[0, 2]])


def test_the_dn_label_book_is_mapped_like_the_class_rows(tmp_path):
    class Book(nn.Module):
        training_only_prefixes = ("label_enc.",)

        def __init__(self, num_classes):
            super().__init__()
            self.label_enc = nn.Embedding(num_classes + 1, 4)  # last row: "no label"
            self.class_embed = nn.Linear(2, num_classes)

    source = Book(5)
    our_checkpoint(source, CategoryMap([2, 4, 6, 8, 10], ["b", "d", "f", "h", "j"]), tmp_path / "book.pth")
    target = Book(2)
    report = ckpt_io.load_weights(target, tmp_path / "book.pth", CategoryMap([8, 2], ["h", "b"]))
    assert report.mapped == ["label_enc.weight", "class_embed.weight", "class_embed.bias"]
    assert torch.equal(target.label_enc.weight, source.label_enc.weight[[3, 0, 5]])

    # The official DN-DETR layout: 92-row label book and 91-row heads indexed by COCO id.
    official = Book(91)
    torch.save({"model": official.state_dict()}, tmp_path / "dn_official.pth")
    coco80 = Book(80)
    report = ckpt_io.load_for_inference(coco80, tmp_path / "dn_official.pth", categories(COCO_IDS))
    assert torch.equal(coco80.label_enc.weight[:80], official.label_enc.weight[COCO_IDS])
    assert torch.equal(coco80.label_enc.weight[80], official.label_enc.weight[91])
    # A label book that cannot be matched never blocks inference: no DN queries are built there.
    torch.save({"model": {k: v for k, v in official.state_dict().items() if k != "label_enc.weight"}},
               tmp_path / "no_book.pth")
    report = ckpt_io.load_for_inference(Book(80), tmp_path / "no_book.pth", categories(COCO_IDS))
    assert report.missing == ["label_enc.weight"]


def test_an_official_layout_dino_file_maps_every_class_head_and_the_label_book(tmp_path):
    """IDEA-Research/DINO's layout (tests/support/official_layouts.py): 91-row heads indexed by COCO id in
    class_embed.{j}, transformer.decoder.class_embed.{j} and transformer.enc_out_class_embed, a 92-row
    label book, no category map. An 80-category model takes every tensor, each class row by category."""
    sizes = dict(hidden=32, ffn=64, enc_layers=1, dec_layers=2, queries=10, levels=3, heads=2, points=2,
                 backbone_channels=(32, 64, 128))
    cfg = tiny_model_config(*DINO, "model.backbone_width=16", "model.hidden_dim=32", "model.nheads=2",
                            "model.num_queries=10", "model.num_feature_levels=3")
    model, _, _ = build_model(cfg, 80)
    official = official_dino_file(model, generator=torch.Generator().manual_seed(0), **sizes)
    torch.save(official, tmp_path / "checkpoint0011_like.pth")
    report = ckpt_io.load_for_inference(model, tmp_path / "checkpoint0011_like.pth", categories(COCO_IDS))
    assert report.missing == report.unused == report.mismatched == report.fresh == []
    assert report.categories_without_row == [] and report.matched_by == "name"
    heads = ["transformer.enc_out_class_embed"] + [f"{owner}class_embed.{j}" for owner in ("", "transformer.decoder.")
                                                   for j in range(2)]
    assert sorted(report.mapped) == sorted(["label_enc.weight"] + [f"{h}.{p}" for h in heads for p in ("weight", "bias")])
    state, file_state = model.state_dict(), official["model"]
    for head in heads:
        assert torch.equal(state[head + ".weight"], file_state[head + ".weight"][COCO_IDS])
        assert torch.equal(state[head + ".bias"], file_state[head + ".bias"][COCO_IDS])
    assert torch.equal(state["label_enc.weight"][:80], file_state["label_enc.weight"][COCO_IDS])
    assert torch.equal(state["label_enc.weight"][80], file_state["label_enc.weight"][91])
    for key in ("transformer.tgt_embed.weight", "transformer.decoder.norm.weight", "bbox_embed.1.layers.2.weight",
                "transformer.enc_out_bbox_embed.layers.0.weight"):
        assert torch.equal(state[key], file_state[key])
