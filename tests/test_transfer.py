"""Transfer learning (issue #21): `init_from` a checkpoint or a torchvision state dict, `frozen` layers, resume."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess

import forkserver
import jax
import numpy as np
import pytest
from conftest import FAST_COMPILE, REPO, load_script

from alexnet_jax import checkpointing, optim, train
from alexnet_jax.errors import UserError

photo_folder = load_script("make_photo_folder")
TINY = dict(variant="small", resize_size=36, image_size=32, widths=(16, 32, 32, 32, 32), fc_width=32,
            norm="", groups=0)


def _config_file(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _set(c, **kw):
    for k, v in kw.items():
        c[k] = v
    return c


@pytest.fixture(scope="module")
def folder3(tmp_path_factory) -> tuple[str, str]:
    root = str(tmp_path_factory.mktemp("new_classes") / "photos")
    photo_folder.write_photo_folder(root, classes=3, per_class=30, seed=5)
    return root, str(tmp_path_factory.mktemp("tfds"))


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        name = f"{prefix}/{k}" if prefix else k
        out.update(_flat(v, name) if isinstance(v, dict) else {name: np.asarray(v)})
    return out


def test_finetune_from_an_imagenet_run_with_frozen_convs(prepared, folder3, tmp_path, caplog):
    """Pretrain on the tiny ILSVRC-format archive, fine-tune on 3 new classes with conv1-5 frozen: >= 90% held
    out; conv parameters bitwise the pretrained ones; no optimizer state for them; fc8 re-initialised (logged)."""
    pre_dir, fine_dir = str(tmp_path / "pretrain"), str(tmp_path / "finetune")
    pre = _set(_config_file("imagenet"), data_dir=prepared[0], batch_size=8, eval_batch_size=8,
               num_train_steps=24, normalization="channel", init_scheme="he", learning_rate=0.02,
               lr_reference_batch=0, lr_schedule="constant", log_every_steps=24, eval_crops=1, num_classes=1000,
               eval_every_steps=24, **TINY)  # one evaluation (and its checkpoint), not one per 4-step epoch
    train.train_and_evaluate(pre, pre_dir)
    root, data_dir = folder3
    fine = _set(_config_file("finetune"), init_from=pre_dir, folder=root, data_dir=data_dir, batch_size=16,
                eval_batch_size=24, num_epochs=30.0, learning_rate=0.05, dropout_rate=0.0, holdout_fraction=0.2,
                log_every_steps=10, eval_every_steps=10_000, train_crop="paper", **TINY)
    with caplog.at_level("INFO"):
        summary = train.train_and_evaluate(fine, fine_dir)
    assert summary["top1_accuracy"] >= 0.9, summary
    log = caplog.text
    assert "init_from step 24 of" in log and "fc8/kernel (32, 3), pretrained (32, 1000)" in log, log[-3000:]
    assert "fc8/bias (3,), pretrained (1000,)" in log
    before = _flat(checkpointing.restore_as_saved(pre_dir, 24)["params"])
    after = _flat(checkpointing.restore_as_saved(fine_dir, summary["step"])["params"])
    convs = [k for k in before if k.startswith("conv")]
    assert len(convs) == 10
    for k in convs:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)  # frozen: bitwise, no weight decay
    for k in ("fc6/kernel", "fc7/kernel"):
        assert not np.array_equal(after[k], before[k]), k  # trained from the pretrained values
    # the optimizer state holds momentum only for the trained layers
    spec = train.RunSpec.from_config(fine).with_classes(3)  # the 3 class folders (the config keeps its 0)
    trainer = train.Trainer(spec, train.sharding.make_mesh((1, 1), jax.devices()[:1]),
                            (32, 32, 3), 4, 40)
    paths = ["/".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path)
             for path, _ in jax.tree_util.tree_leaves_with_path(trainer.abstract_state.opt_state)]
    assert not [p for p in paths if "conv" in p], paths
    assert sum("fc6" in p for p in paths) == 2 and sum("fc8" in p for p in paths) == 2


def test_frozen_labels_and_bad_patterns():
    params = {"conv1": {"kernel": 0, "bias": 0}, "fc6": {"kernel": 0, "bias": 0}, "fc8": {"kernel": 0, "bias": 0}}
    assert optim.frozen_labels("conv.*|fc6")(params) == {
        "conv1": {"kernel": "frozen", "bias": "frozen"}, "fc6": {"kernel": "frozen", "bias": "frozen"},
        "fc8": {"kernel": "trained", "bias": "trained"}}
    assert optim.frozen_labels("fc8/bias")(params)["fc8"] == {"kernel": "trained", "bias": "frozen"}
    c = _config_file("finetune")
    c.frozen = "conv[("
    with pytest.raises(UserError, match="frozen.*not a regular expression"):
        train.RunSpec.from_config(c)  # every key checked where the config is read


def _torchvision_state_dict(torch, path: str, widths=(8, 16, 16, 16, 8), fc=32, classes=10) -> None:
    """A torchvision-layout AlexNet state dict (narrow widths), saved with torch.save."""
    g = torch.Generator().manual_seed(0)
    state, cin = {}, 3
    for key, k, w in zip(("features.0", "features.3", "features.6", "features.8", "features.10"),
                         (11, 5, 3, 3, 3), widths, strict=True):
        state[f"{key}.weight"] = torch.randn(w, cin, k, k, generator=g) * 0.05
        state[f"{key}.bias"] = torch.randn(w, generator=g) * 0.01
        cin = w
    fan = cin * 36
    for key, out in (("classifier.1", fc), ("classifier.4", fc), ("classifier.6", classes)):
        state[f"{key}.weight"] = torch.randn(out, fan, generator=g) * 0.05
        state[f"{key}.bias"] = torch.zeros(out)
        fan = out
    torch.save(state, path)


@pytest.mark.torch
def test_torchvision_state_dict_then_resume_after_a_kill(folder3, tmp_path, torch_lib, python):
    """init_from a .pth; killed after step 3 (checkpoint at 2), the pretrained file deleted, the same command
    resumes at 2 and ends where an uninterrupted run ends: the resumed run never re-loads the pretrained weights."""
    pth = str(tmp_path / "alexnet-narrow.pth")
    _torchvision_state_dict(torch_lib, pth)
    root, data_dir = folder3
    flags = [f"--config.init_from={pth}", f"--config.folder={root}", f"--config.data_dir={data_dir}",
             "--config.widths=(8,16,16,16,8)", "--config.fc_width=32", "--config.image_size=64",
             "--config.resize_size=72", "--config.batch_size=8", "--config.eval_batch_size=24",
             "--config.num_train_steps=5", "--config.checkpoint_every_steps=2", "--config.log_every_steps=1",
             "--config.mesh_shape=(1,1)"]
    env = {**os.environ, "XLA_FLAGS": FAST_COMPILE, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}

    def run(script: list[str], workdir: str) -> subprocess.CompletedProcess:
        return forkserver.run([python, *script, "--config", os.path.join(REPO, "configs/finetune.py"), *flags,
                               "--workdir", workdir], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    whole = run(["-m", "alexnet_jax.main"], str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert "init_from torchvision state dict" in whole.stderr and "loaded 14 arrays" in whole.stderr
    converted = _flat(train.pretrained.to_flax_params(train.pretrained.load_state_dict(pth)))
    killed = run(["tests/signal_after_step.py", "3", "SIGKILL"], str(tmp_path / "killed"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert "step 3/5" in killed.stderr and "step 4/5" not in killed.stderr  # killed right after step 3
    assert sorted(os.listdir(tmp_path / "killed" / "checkpoints")) == ["2"]  # the last save before the kill
    os.remove(pth)
    resumed = run(["-m", "alexnet_jax.main"], str(tmp_path / "killed"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.search(r"resumed from \S*checkpoints/2: step 2 ", resumed.stderr), resumed.stderr[-3000:]
    after = resumed.stderr.split("resumed from")[1]
    assert "init_from" not in after and "step 3/5" in after and "step 2/5" not in after
    a = _flat(checkpointing.restore_as_saved(str(tmp_path / "whole"), 5)["params"])
    b = _flat(checkpointing.restore_as_saved(str(tmp_path / "killed"), 5)["params"])
    for k in a:
        np.testing.assert_array_equal(b[k], a[k], err_msg=k)  # bitwise, as every other resume
    for k in converted:  # conv1-5 frozen at torchvision's values; fc6, fc7 trained from them; fc8 new (3 classes)
        if k.startswith("conv"):
            np.testing.assert_array_equal(a[k], converted[k], err_msg=k)
    assert a["fc8/kernel"].shape == (32, 3) and converted["fc8/kernel"].shape == (32, 10)
    with pytest.raises(UserError, match="init_from=.*no such file"):
        train.pretrained.read(pth)


def test_features_of_a_split_and_the_figure_4_neighbours(folder3, tmp_path, python):
    """fc7 features of the training split: one row per image, equal to the network's fc7 activations (flax's
    own capture of the Dense output, after the ReLU); `nearest` ranks as float64 distances do and finds a planted
    near-duplicate; the CLI writes the npz and the Figure 4 PNG."""
    from alexnet_jax import features

    root, data_dir = folder3
    workdir = str(tmp_path / "run")
    config = _set(_config_file("folder"), folder=root, data_dir=data_dir, batch_size=16, eval_batch_size=16,
                  num_train_steps=4, holdout_fraction=0.2, log_every_steps=4, **TINY)
    train.train_and_evaluate(config, workdir)
    extractor = features.Extractor(workdir)
    got = features.of_split(extractor, "train", "fc7")
    assert got["features"].shape == (72, 32) and got["labels"].shape == (72,)
    assert len(set(got["file_names"])) == 72 and all(n.startswith("class_") for n in got["file_names"])
    loaded = extractor.loaded
    _, state = jax.jit(lambda v, x: loaded.model.apply(v, x, train=False, capture_intermediates=True,
                                                       mutable=["intermediates"]))(loaded.variables,
                                                                                   got["images"][:16])
    fc7 = np.maximum(np.asarray(state["intermediates"]["fc7"]["__call__"][0]), 0)
    np.testing.assert_allclose(got["features"][:16], fc7, rtol=1e-5, atol=1e-6)
    assert (got["features"] > 0).any()
    # neighbours against an independent ranking: float64 Euclidean distances by broadcasting (not the Gram
    # expansion `nearest` uses), on queries that are not pool rows; a planted near-duplicate of the pool's most
    # isolated row (moved by 1% of its distance to the next row) must come first
    pool = got["features"].astype(np.float64)
    apart = np.sqrt(((pool[:, None] - pool[None]) ** 2).sum(-1)) + np.diag(np.full(72, np.inf))
    i = int(np.argmax(apart.min(1)))
    assert apart[i].min() > 0
    queries = np.stack([pool[i] + 0.01 * apart[i].min() / np.sqrt(32), pool[:9].mean(0), pool[60:].mean(0)])
    index = features.nearest(queries.astype(np.float32), got["features"], 3)
    assert index[0, 0] == i
    dist = np.sqrt(((queries[:, None] - pool[None]) ** 2).sum(-1))
    np.testing.assert_allclose(np.take_along_axis(dist, index, 1), np.sort(dist, 1)[:, :3], rtol=1e-4, atol=1e-6)
    pool5 = features.of_split(extractor, "eval", "pool5")["features"]
    assert pool5.shape[0] == 18
    out, png = str(tmp_path / "f.npz"), str(tmp_path / "n.png")
    env = {**os.environ, "XLA_FLAGS": FAST_COMPILE, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
    r = forkserver.run([python, "-m", "alexnet_jax.features", "--workdir", workdir, "--out", out, "--neighbours",
                        "3", "--queries", "2", "--figure", png], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    with np.load(out) as f:
        assert f["features"].shape == (18, 32) and str(f["layer"]) == "fc7"
        assert list(f["class_names"]) == ["class_a", "class_b", "class_c"]
    from PIL import Image

    with Image.open(png) as image:
        assert image.size[0] > 300 and image.size[1] > 150
