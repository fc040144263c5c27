"""cifarctl: train and use CIFAR-10 classifiers from the command line."""

__version__ = "0.1.0"
