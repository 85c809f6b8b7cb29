"""The names a checkpoint's classes print as: its own record, else the dataset's; ImageNet's WordNet ids with their
first lemma (`n01440764 tench`, from alexnet_jax/resources/imagenet_names.txt)."""

from __future__ import annotations

import functools
import os
from typing import Any

NAMES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "resources", "imagenet_names.txt")


def class_names(dataset: str, meta: dict[str, Any], num_classes: int) -> list[str]:
    """The checkpoint's class names; else the dataset's (ImageNet: tfds's imagenet2012 synset labels)."""
    from alexnet_jax import data as datalib

    names = meta.get("class_names")
    if names and len(names) == num_classes:
        return list(names)
    if dataset == "fashion_mnist":
        return list(datalib.FASHION_MNIST_CLASSES)
    if dataset == "cifar10":
        return list(datalib.CIFAR10_CLASSES)
    if dataset == "imagenet2012":
        with open(NAMES_FILE) as f:
            return [line.split("\t")[0] for line in f.read().splitlines()]
    return [str(i) for i in range(num_classes)]


@functools.cache
def _lemmas() -> dict[str, str]:
    """WordNet id -> its first lemma, read once per process (not once per printed image)."""
    with open(NAMES_FILE) as f:
        return {w: rest.split(", ")[0] for w, rest in (line.split("\t") for line in f.read().splitlines())}


def readable_names(names: list[str]) -> list[str]:
    """WordNet ids with their first lemma beside them ('n01440764 tench'); other names as they are."""
    lemma = _lemmas()
    return [f"{n} {lemma[n]}" if n in lemma else n for n in names]
