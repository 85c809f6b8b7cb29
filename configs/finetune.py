"""Fine-tune pretrained AlexNet weights on your images (transfer learning):

    python -m alexnet_jax.main --config configs/finetune.py --config.init_from=alexnet-owt-7be5be79.pth \
        --config.folder=/path/to/photos --workdir runs/finetune

`init_from`: torchvision's `alexnet` state dict (.pth), or an alexnet_jax workdir / `checkpoints/<step>` directory
(then set the architecture keys, `variant`, `widths`, `fc_width`, to its; the log names any that differ). The
data: a folder (`configs/folder.py` explains the layout) or, with `--config.dataset=NAME`, any tfds dataset.

The standard transfer recipe (torchvision's fine-tuning tutorial, Keras's "transfer learning" guide), as keys:
- the pretrained conv layers are frozen (`frozen='conv.*'`: no update, no weight decay, no momentum buffer), the
  classifier fc6-fc8 is trained; fc8 is initialised afresh for your class count. `--config.frozen=''` fine-tunes
  everything (at a smaller learning rate, e.g. 0.0003), `'conv.*|fc6|fc7'` trains fc8 alone (a linear probe).
- inputs as the pretrained weights saw them: torchvision's ImageNet mean/std (or the checkpoint's own
  normalisation; `init_normalisation='data'` recomputes it from your images), 224 px crops of the image resized
  to 256 with PIL-style antialiased bilinear;
- training: random resized crops (8-100% of the area) and reflections, no PCA lighting; evaluation: the centre
  crop (`eval_crops=10` for the paper's 10 patches);
- SGD with momentum 0.9, weight decay 5e-4, learning rate 0.001 at batch 32 with a cosine decay, 15 epochs.
Dropout stays on in fc6/fc7 while they train (frozen or not, dropout has no parameters: it is on in training
as in torchvision's `model.train()`); BatchNorm variants keep updating frozen layers' statistics in training,
as torchvision does (Keras instead runs frozen BatchNorm layers in inference mode).
"""

from alexnet_jax import default_config


def get_config():
    c = default_config.get_config()
    c.init_from = ""  # required: a .pth state dict, a workdir or a checkpoints/<step> directory
    c.init_normalisation = "pretrained"
    c.frozen = "conv.*"
    c.dataset = "folder"
    c.folder = ""  # your images, or --config.dataset=<tfds name>
    c.num_classes = 0  # the dataset's
    c.holdout_fraction = 0.1
    c.variant = "owt"  # torchvision's alexnet
    c.init_scheme = "he"  # for the new fc8 (and anything else not loaded)
    c.image_size = 224
    c.resize_size = 256
    c.resize_method = "antialias"
    c.normalization = "channel"
    c.train_crop = "random_resized"
    c.random_flip = True
    c.pca_lighting = 0.0
    c.stats_examples = 0
    c.dropout_rate = 0.5
    c.batch_size = 32
    c.learning_rate = 0.001
    c.lr_reference_batch = 32
    c.momentum = 0.9
    c.weight_decay = 5e-4
    c.lr_schedule = "cosine"
    c.warmup_epochs = 0.0
    c.num_epochs = 15.0
    c.eval_crops = 1
    c.eval_batch_size = 50
    c.log_every_steps = 10
    c.checkpoint_every_steps = 0
    return c
