"""CPU quick start: the small-input AlexNet on the real FashionMNIST files: 91.21% top-1 in 636 s on 2 cores
(8 epochs, image + reflection; README's results table says which machine and commit)."""

from alexnet_jax import default_config


def get_config():
    c = default_config.get_config()
    c.dataset = "fashion_mnist"
    c.image_size = 28
    c.num_classes = 10
    c.variant = "small"
    c.widths = (16, 64, 96, 96, 64)  # conv1 at 28x28 dominates the cost: 16 maps there, wider deeper
    c.fc_width = 512
    c.init_scheme = "he"
    c.crop_padding = 0  # the model underfits in 7 epochs: flips only (crop_padding=2 cost ~1% top-1 at 5 epochs)
    c.random_flip = True
    c.batch_size = 64  # twice the updates per epoch of 128 (90.68% at 7 epochs) for ~10% fewer images/s
    c.dropout_rate = 0.3  # 0.5 (the paper's) reaches 90.96% in 7 epochs here; 0.3 trains faster
    c.num_epochs = 8.0  # 7 epochs: 90.98% (docs/paper.md)
    c.learning_rate = 0.01  # 0.02 at batch 128, scaled linearly
    c.lr_schedule = "cosine"
    c.warmup_epochs = 0.5
    c.eval_crops = 2  # the paper's test reduced to 28 px: softmax averaged over the image and its reflection
    c.log_every_steps = 100
    return c
