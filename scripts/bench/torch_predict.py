"""The script a PyTorch user writes to classify a folder with torchvision's AlexNet: the yardstick of
`benchmark.py --mode predict`. torchvision's evaluation transforms (`Resize(256)`: the shorter side to 256 with
PIL's bilinear, `CenterCrop(224)`, `ToTensor`, `Normalize`) written with PIL and torch (torchvision does not
install beside torch 2.13 here), a `DataLoader` with 2 workers and batch 50, `torch.no_grad()`, top-5 per file.

Usage: python scripts/bench/torch_predict.py WEIGHTS.pth FOLDER
"""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MEAN, STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def transform(path: str) -> torch.Tensor:
    with Image.open(path) as image:
        image = image.convert("RGB")
        w, h = image.size
        image = image.resize((256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256), Image.BILINEAR)
        top, left = int(round((image.height - 224) / 2.0)), int(round((image.width - 224) / 2.0))
        x = np.asarray(image.crop((left, top, left + 224, top + 224)), np.float32) / 255.0
    return torch.from_numpy(((x - MEAN) / STD).transpose(2, 0, 1).copy())


class Files(torch.utils.data.Dataset):
    def __init__(self, paths: list[str]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return transform(self.paths[i])


def main() -> None:
    weights, folder = sys.argv[1:3]
    spec = importlib.util.spec_from_file_location("tv", os.path.join(REPO, "tests", "torchvision_alexnet.py"))
    tv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tv)  # torchvision's module tree, layer for layer
    model = tv.TorchvisionAlexNet()
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    paths = sorted(os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs if f.lower().endswith(EXTENSIONS))
    loader = torch.utils.data.DataLoader(Files(paths), batch_size=50, num_workers=2)
    done = 0
    with torch.no_grad():
        for batch in loader:
            probs = torch.softmax(model(batch), 1)
            top = torch.topk(probs, 5)
            for path, p, i in zip(paths[done : done + len(batch)], top.values, top.indices, strict=True):
                print(path, " ".join(f"{int(c)}:{float(q):.4f}" for q, c in zip(p, i, strict=True)))
            done += len(batch)


if __name__ == "__main__":
    main()
