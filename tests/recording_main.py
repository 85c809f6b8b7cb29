"""`python tests/recording_main.py OUT.npz MAIN_FLAGS...`: `python -m alexnet_jax.main MAIN_FLAGS...` with the rows
each evaluation saw recorded: the image and label of every real (mask 1) row of the batches the trainer's
`evaluate` consumed, written to OUT.npz ("images_<k>", "labels_<k>" for the k-th evaluation) when main returns.
For a test that identifies each evaluated row by its source record (tests/test_train.py)."""

import runpy
import sys

import numpy as np

from alexnet_jax import train

out = sys.argv.pop(1)
seen: list[tuple[list[np.ndarray], list[np.ndarray]]] = []
evaluate = train.Trainer.evaluate


def recording_evaluate(self, state, batches):
    images, labels = [], []
    seen.append((images, labels))

    def recorded():
        for b in batches:
            real = np.asarray(b["mask"]) > 0
            images.append(np.asarray(b["image"])[real])
            labels.append(np.asarray(b["label"])[real])
            yield b

    return evaluate(self, state, recorded())


train.Trainer.evaluate = recording_evaluate
sys.argv[0] = "alexnet_jax.main"
try:
    runpy.run_module("alexnet_jax.main", run_name="__main__", alter_sys=True)
finally:
    np.savez(out, **{f"{key}_{k}": np.concatenate(arrays) for k, (images, labels) in enumerate(seen)
                     for key, arrays in (("images", images), ("labels", labels)) if arrays})
