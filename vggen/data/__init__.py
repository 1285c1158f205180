"""Datasets (CIFAR-10, scikit-learn's digits at 32x32x3), augmentation and batching."""
