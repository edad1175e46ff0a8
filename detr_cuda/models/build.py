"""build_model: config -> (model, criterion, postprocessor), the wiring in one visible place."""
from .anchor_detr import build_anchor_detr
from .backbone import build_backbone
from .criterion import build_criterion
from .deformable_detr import DeformableDETR
from .deformable_transformer import build_deformable_transformer
from .dino import build_dino
from .matcher import build_matcher
from .postprocess import build_postprocessor


def build_model(cfg, num_classes=None):
    """Returns (DeformableDETR, SetCriterion, PostProcess) for ``cfg`` (a detr_cuda.config.Config,
    whose values config.py has checked).

    ``model.query_type`` "anchor" builds the DN-Deformable-DETR detector (AnchorDeformableDETR),
    "dino" DINO (dino.py); ``dn.enabled`` adds the DN losses to the criterion.

    num_classes: number of class logits (labels are 0 .. num_classes-1), normally from the
    dataset; ``cfg.model.num_classes`` overrides it when set.
    """
    model_cfg = cfg.model
    if model_cfg.num_classes is not None:
        num_classes = model_cfg.num_classes
    if num_classes is None or num_classes < 1:
        raise ValueError(f"number of classes unknown or < 1 ({num_classes}): pass the dataset's count or set "
                         "model.num_classes")
    backbone = build_backbone(cfg)
    transformer = build_deformable_transformer(cfg)
    if model_cfg.query_type == "anchor":
        model = build_anchor_detr(cfg, backbone, transformer, num_classes)
    elif model_cfg.query_type == "dino":
        model = build_dino(cfg, backbone, transformer, num_classes)
    else:
        model = DeformableDETR(backbone, transformer, num_classes=num_classes, num_queries=model_cfg.num_queries,
                               num_feature_levels=model_cfg.num_feature_levels, aux_loss=model_cfg.aux_loss,
                               with_box_refine=model_cfg.with_box_refine, two_stage=model_cfg.two_stage)
    return model, build_criterion(cfg, num_classes, build_matcher(cfg)), build_postprocessor(cfg)
