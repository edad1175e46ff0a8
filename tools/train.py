#!/usr/bin/env python
"""Train a detector.

    python tools/train.py --config configs/deformable_detr.yaml [--resume PATH|auto] [--weights PATH] [key=value ...]
    torchrun --nproc_per_node=8 tools/train.py --config ... [key=value ...]
    torchrun --nnodes=2 --node-rank=R --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT \\
        tools/train.py --config ...

--resume continues a run exactly (weights, optimizer, schedule, scaler, EMA,
position in the epoch, random streams); "auto" takes checkpoint_last.pth from
train.output_dir if there is one. --resume PATH without --config goes on in
PATH's folder; a train.output_dir other than PATH's folder must not hold a
checkpoint_last.pth of its own (it would be overwritten). --weights only initialises the model (fine-
tuning; official Deformable DETR checkpoints included). Overrides are
section.field=value, e.g. train.lr=1e-4 data.train_images=/data/coco/train2017.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detr_cuda.config import ConfigError, config_from_dict, load_config  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file (configs/*.yaml)")
    parser.add_argument("--resume", metavar="PATH|auto", help="continue a run from its checkpoint")
    parser.add_argument("--weights", metavar="PATH", help="initialise the model from these weights only")
    parser.add_argument("--allow-config-change", "--allow_config_change", action="store_true",
                        help="resume even though the config differs from the checkpoint's")
    # torch.distributed.launch passes --local-rank/--local_rank; torchrun sets LOCAL_RANK. Accept and ignore.
    parser.add_argument("--local-rank", "--local_rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="section.field=value")
    return parser.parse_intermixed_args(argv)


def resolve_config(args):
    """The run's config: --config (or, for --resume PATH alone, the checkpoint's) plus overrides.

    With --resume PATH alone the run goes on in PATH's own folder (not the
    output folder stored in the checkpoint, which may be another run's after
    a copy) unless train.output_dir is given as an override.
    """
    if args.config is None and args.resume not in (None, "auto"):
        from detr_cuda.engine.resume import load_training_checkpoint
        checkpoint = load_training_checkpoint(args.resume)
        config = config_from_dict(checkpoint["config"])
        config.train.output_dir = os.path.dirname(os.path.abspath(args.resume))
        return load_config(None, args.overrides, base=config)
    if args.config is None:
        raise ConfigError("--config is required (or --resume PATH, which reuses the checkpoint's config)")
    return load_config(args.config, args.overrides)


def main(argv=None):
    args = parse_args(argv)
    prefix = f"[rank {os.environ.get('RANK', '0')}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    if args.resume and args.weights:
        print("error: --resume continues a run (and restores its weights); --weights starts a new run from "
              "weights. Use one of them.", file=sys.stderr)
        return 2
    from detr_cuda.checkpoint import CheckpointError
    try:
        config = resolve_config(args)
    except ConfigError as error:
        print(f"{prefix}config error: {error}", file=sys.stderr)
        return 2
    except (CheckpointError, FileNotFoundError) as error:  # --resume PATH without --config reads PATH
        print(f"{prefix}error: {error}", file=sys.stderr)
        return 2

    from detr_cuda.data import AnnotationFileError, DatasetValidationError
    from detr_cuda.engine.resume import ResumeConfigMismatch
    from detr_cuda.engine.trainer import NonFiniteLossError, run_training
    from detr_cuda.util.dist import DistributedSetupError, PeerLostError
    try:
        return run_training(config, resume=args.resume, weights=args.weights,
                            allow_config_change=args.allow_config_change)
    except PeerLostError as error:
        print(f"{prefix}error: {error}", file=sys.stderr, flush=True)
        os._exit(1)  # skip process-group teardown, which could wait on the dead peer
    except NonFiniteLossError as error:
        print(f"{prefix}error: {error}", file=sys.stderr, flush=True)
        return 1
    except (ConfigError, ResumeConfigMismatch, FileExistsError, FileNotFoundError, DatasetValidationError,
            AnnotationFileError, CheckpointError, DistributedSetupError,
            PermissionError, NotADirectoryError, IsADirectoryError) as error:  # the last three: an output folder
        print(f"{prefix}error: {error}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
