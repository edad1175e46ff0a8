"""Training and evaluation machinery, one concern per module.

distributed   torchrun environment, process group (nccl/gloo) with timeouts, collectives
optim         AdamW with the three parameter groups, step LR drop with optional warm-up
checkpoint    atomic checkpoint files, safe loading, per-rank RNG state
weights       --weights: initialise a model from our or the official checkpoints
ema           exponential moving average of the weights
train_loop    one epoch: loss weighting, accumulation, autocast, clipping, non-finite handling
evaluate      model + postprocessor + the data package's COCO evaluator
logger        console, log.jsonl and TensorBoard (rank 0)
signals       SIGTERM/SIGINT -> stop after the current step
trainer       the run: set-up, resume, epochs, evaluation, checkpoints (tools/train.py)
evaluation_run  a stand-alone evaluation job (tools/eval.py)
"""
