"""Image data: folders, CIFAR pickles, calibration sets and torch-only preprocessing."""

from .calib import load_calibration_data, load_image_tensor, sample_calibration_images
from .cifar import CifarDataset, download_cifar, read_cifar_batch
from .folder import IMAGE_EXTENSIONS, ImageFolderDataset, make_loader, read_class_index
from .transforms import (
    denormalize,
    load_and_preprocess,
    load_image,
    normalize,
    preprocess,
    resize_and_crop,
    to_rgb,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "CifarDataset",
    "ImageFolderDataset",
    "denormalize",
    "download_cifar",
    "load_and_preprocess",
    "load_calibration_data",
    "load_image",
    "load_image_tensor",
    "make_loader",
    "normalize",
    "preprocess",
    "read_cifar_batch",
    "read_class_index",
    "resize_and_crop",
    "sample_calibration_images",
    "to_rgb",
]
