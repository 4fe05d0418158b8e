"""``piip demo``: the paper's claims in miniature, trained and measured on this machine.

``classification`` (``piip demo``): tiny PIIP-TSB against ViT-B on Fashion-MNIST.
``detection`` (``piip demo det``): the same pair as Mask R-CNN backbones on Fashion-MNIST scenes.
``segmentation`` (``piip demo seg``): the same pair under UperNet on the scenes' per-pixel classes.
"""
from .classification import DemoResult, demo_runs, plot_accuracy_vs_macs, run_demo

__all__ = ["DemoResult", "demo_runs", "run_demo", "plot_accuracy_vs_macs"]
