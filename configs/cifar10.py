"""CIFAR-10 (tfds `cifar10`, 32x32 RGB): the small-input AlexNet with the usual pad-4 crops and flips.

Offline, put `cifar-10-binary.tar.gz` in `--config.manual_dir` (tfds's `<data_dir>/downloads/manual` when unset);
tfds checks its checksum and prepares it once. Accuracy has not been measured on this project's machine,
which cannot download CIFAR-10: run it and add your figure to the README.
"""

from alexnet_jax import default_config


def get_config():
    c = default_config.get_config()
    c.dataset = "cifar10"
    c.image_size = 32
    c.num_classes = 10
    c.variant = "small"
    c.init_scheme = "he"
    c.crop_padding = 4  # zero-pad to 40x40 and take a random 32x32 crop: the standard CIFAR augmentation
    c.random_flip = True
    c.batch_size = 128
    c.dropout_rate = 0.5
    c.num_epochs = 30.0
    c.learning_rate = 0.02
    c.lr_schedule = "cosine"
    c.warmup_epochs = 1.0
    c.eval_crops = 2  # softmax averaged over the image and its reflection
    c.log_every_steps = 100
    return c
