"""Classification datasets and transforms (Fashion-MNIST, ImageFolder)."""
from .classification import (FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, DataConfig, FashionMNIST,
                             RobustImageFolder, build_dataset, build_transforms, check_num_classes,
                             default_fashion_mnist_root, looks_like_fashion_mnist, resolve_data_arg)

__all__ = ["DataConfig", "build_transforms", "build_dataset", "check_num_classes", "FashionMNIST",
           "RobustImageFolder", "FASHION_MNIST_CLASSES", "FASHION_MNIST_DIR", "default_fashion_mnist_root",
           "looks_like_fashion_mnist", "resolve_data_arg"]
