"""The encoder stage: the LVM (Swin U-Net), its pretraining/finetuning, checkpoints and benchmark.

Submodules import torch; this package itself stays light so ``galsift --help`` is fast.
"""
