"""Training: the loop and the linear probe (``loop``), the mode chosen for the fine-tune step (``finetune``), DDP
(``ddp``, ``torchrun``), checkpoints, inputs (``loaders``), curves, the labels curve and domain adaptation."""
