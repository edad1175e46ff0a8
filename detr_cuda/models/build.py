"""build_model: config -> (model, criterion, postprocessor)."""
from ..config import CHOICES
from .anchor_decoder import build_anchor_transformer
from .anchor_detr import build_anchor_detr
from .backbone import build_backbone
from .criterion import build_criterion
from .denoising import build_dn_criterion, check_dn_config
from .deformable_detr import DeformableDETR
from .deformable_transformer import build_deformable_transformer
from .matcher import build_matcher
from .postprocess import build_postprocessor


def resolve_num_classes(cfg, num_classes):
    """cfg.model.num_classes wins when set (e.g. 91 for the official COCO checkpoints);
    otherwise the dataset's count is used."""
    if cfg.model.num_classes is not None:
        return cfg.model.num_classes
    if num_classes is None:
        raise ValueError("number of classes unknown: pass the dataset's count or set model.num_classes")
    return num_classes


def build_model(cfg, num_classes=None):
    """Returns (DeformableDETR, SetCriterion, PostProcess) for ``cfg`` (a detr_cuda.config.Config).

    ``model.query_type`` "anchor" builds the DN-Deformable-DETR detector (AnchorDeformableDETR);
    ``dn.enabled`` adds the DN losses to the criterion (DNSetCriterion).

    num_classes: number of class logits (labels are 0 .. num_classes-1), normally from the
    dataset; ``cfg.model.num_classes`` overrides it when set.
    """
    model_cfg = cfg.model
    num_classes = resolve_num_classes(cfg, num_classes)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if model_cfg.query_type not in CHOICES["model.query_type"]:
        raise ValueError(f"model.query_type must be one of {', '.join(CHOICES['model.query_type'])}, "
                         f"got '{model_cfg.query_type}'")
    if cfg.dn.enabled and model_cfg.query_type != "anchor":
        raise ValueError("dn.enabled needs model.query_type 'anchor' (DN-Deformable-DETR: DN queries are "
                         "anchor boxes)")
    if cfg.dn.enabled:
        check_dn_config(cfg.dn)
    if model_cfg.num_feature_levels < 1:
        raise ValueError(f"model.num_feature_levels must be >= 1, got {model_cfg.num_feature_levels}")
    if model_cfg.hidden_dim % 32 != 0:
        raise ValueError(f"model.hidden_dim must be a multiple of 32 (GroupNorm(32) in the input projections), "
                         f"got {model_cfg.hidden_dim}")
    backbone = build_backbone(cfg)
    if model_cfg.query_type == "anchor":
        model = build_anchor_detr(cfg, backbone, build_anchor_transformer(cfg), num_classes)
    else:
        transformer = build_deformable_transformer(cfg)
        model = DeformableDETR(backbone, transformer, num_classes=num_classes, num_queries=model_cfg.num_queries,
                               num_feature_levels=model_cfg.num_feature_levels, aux_loss=model_cfg.aux_loss,
                               with_box_refine=model_cfg.with_box_refine, two_stage=model_cfg.two_stage)
    if cfg.dn.enabled:
        criterion = build_dn_criterion(cfg, num_classes, build_matcher(cfg))
    else:
        criterion = build_criterion(cfg, num_classes, build_matcher(cfg))
    return model, criterion, build_postprocessor(cfg)


def set_msda_backend(model, backend):
    """Points every MSDeformAttn layer of ``model`` at ``backend`` (None = automatic by device)."""
    from ..ops import MSDeformAttn
    count = 0
    for module in model.modules():
        if isinstance(module, MSDeformAttn):
            module.backend = backend
            count += 1
    return count
