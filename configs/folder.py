"""The paper's recipe on a folder of your own images:

    python -m alexnet_jax.main --config configs/folder.py --config.folder=/path/to/photos --workdir runs/photos

The folder: `photos/<class>/*.jpg` (a tenth held out for evaluation, `holdout_fraction`) or
`photos/train/<class>/*` with `photos/val/<class>/*` (or `valid`, `test`). JPEG, PNG, WebP, TIFF, GIF, BMP,
PPM and PGM in any mode (CMYK, grayscale, RGBA, 16-bit, palette) become RGB; an unreadable file stops the run
before training, named.

Set: `folder` (required); for the size of your set, `num_epochs` and `batch_size`. Computed from the data: the
class count and names (folder names), the per-channel mean and std, and the RGB PCA for the lighting. The rest is
the paper's (sections 4.1 and 5): shorter side 256, random 224 patches, reflections, PCA lighting, 10-crop test;
SGD with momentum 0.9 and weight decay 5e-4. Sized for a few hundred to a few thousand images: batch 32 at
learning rate 0.01 (more updates per epoch; scaled linearly if you change the batch), He initialisation on
inputs normalised per channel, and a cosine schedule with two epochs of warm-up, 60 epochs. (The paper's
N(0, 0.01) init on mean-image-subtracted 0-255 pixels and divide-on-plateau need ImageNet's many steps: on 90
generated photos they stayed at chance, and He init on unscaled pixels diverged, where this learned in 25 steps.)
From scratch, a few hundred photos do not support AlexNet's 61M parameters for fine distinctions; fine-tuning
pretrained weights does (docs/photos.md).
"""

from alexnet_jax import default_config


def get_config():
    c = default_config.get_config()
    c.dataset = "folder"
    c.folder = ""  # required: --config.folder=/path/to/photos
    c.num_classes = 0  # the number of class folders
    c.holdout_fraction = 0.1  # used only when the folder has no val/validation/test split
    c.variant = "paper"
    c.image_size = 224
    c.resize_size = 256
    c.train_crop = "paper"
    c.random_flip = True
    c.pca_lighting = 0.1
    c.pca = "data"
    c.normalization = "channel"  # (x - mean) / std per channel, from the training images
    c.stats_examples = 0  # the mean image over every training image
    c.init_scheme = "he"
    c.batch_size = 32
    c.learning_rate = 0.01  # at batch 32 (the paper's rate at a quarter of its batch: a small set's steps)
    c.lr_reference_batch = 32
    c.momentum = 0.9
    c.weight_decay = 5e-4
    c.lr_schedule = "cosine"
    c.warmup_epochs = 2.0
    c.num_epochs = 60.0
    c.eval_crops = 10
    c.eval_batch_size = 50
    c.log_every_steps = 10
    c.checkpoint_every_steps = 0  # at the end, at each evaluation's best, and on SIGTERM
    return c
