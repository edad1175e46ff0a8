"""Training and evaluation machinery, one concern per module.

trainer         the training loop: epochs of steps, evaluation, when checkpoints are written (tools/train.py)
setup           what a run is made of, built in order (device, data, model, weights, optimizer, restore)
resume          --resume: which checkpoint, which config changes a resumed run takes, restoring it
optim           AdamW with the three parameter groups, step LR drop with optional warm-up
ema             exponential moving average of the weights
evaluate        model + postprocessor + the data package's COCO evaluator
evaluation_run  a stand-alone evaluation job (tools/eval.py): weights that must fit, then evaluate
logger          console, log.jsonl and TensorBoard (rank 0); running sums of the loss terms
diagnostics     the environment, a random frozen backbone, a non-finite loss: what a run reports
signals         SIGTERM/SIGINT -> stop after the current step; data loader workers shielded

Checkpoint files are detr_cuda.checkpoint; processes and devices detr_cuda.util.dist / .device.
"""
