"""CPU quick start: the small-input AlexNet on the real FashionMNIST files (>= 91% top-1 in < 10 min)."""

from alexnet_jax import default_config


def get_config():
    c = default_config.get_config()
    c.dataset = "fashion_mnist"
    c.image_size = 28
    c.num_classes = 10
    c.variant = "small"
    c.widths = (32, 64, 96, 96, 64)
    c.fc_width = 256
    c.init_scheme = "he"
    c.crop_padding = 2
    c.random_flip = True
    c.batch_size = 128
    c.num_epochs = 5.0
    c.learning_rate = 0.05
    c.lr_schedule = "cosine"
    c.warmup_epochs = 0.5
    c.log_every_steps = 100
    return c
