"""Multi-view data pipelines (DALI and plain PyTorch), dataset handling and the sample dataset."""

from .batch import Batch
from .datasets import ImageList, file_list, image_folder, load_images, read_exclusions
from .loader import build_loader, dali_available
from .recipes import ColorJitter, Recipe, ViewSpec, build_recipe, recipe_names, register_recipe
from .sample_dataset import CLASSES as SAMPLE_CLASSES
from .sample_dataset import write_sample_dataset
from .scan import ScanResult, scan_dataset
from .sharding import num_batches, shard_batches

__all__ = [
    "Batch", "ColorJitter", "ImageList", "Recipe", "SAMPLE_CLASSES", "ScanResult", "ViewSpec", "build_loader",
    "build_recipe", "dali_available", "file_list", "image_folder", "load_images", "num_batches", "read_exclusions",
    "recipe_names", "register_recipe", "scan_dataset", "shard_batches", "write_sample_dataset",
]
