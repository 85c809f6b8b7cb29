"""CPU quick start: the small-input AlexNet on the real FashionMNIST files: 91.67% top-1 in 227 s on 2 cores
(6 epochs, image + reflection; README's results table says which machine and commit)."""

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
    c.crop_padding = 0  # the model underfits in 6 epochs: flips only (crop_padding=2 cost ~1% top-1 at 5 epochs)
    c.random_flip = True
    c.batch_size = 64  # the most images/s here (31 ms a step; 128: 85 ms, out of cache) and twice 128's updates
    c.dropout_rate = 0.3  # 0.5 (the paper's) reaches 90.96% in 7 epochs here; 0.3 trains faster
    c.num_epochs = 6.0  # at 0.03: 91.67% (5 epochs at 0.02: 91.28%; docs/paper.md)
    c.learning_rate = 0.03  # 6 epochs: 0.01 -> 90.81%, 0.02 -> 91.48%, 0.03 -> 91.67%
    c.lr_schedule = "cosine"
    c.warmup_epochs = 0.5
    # label_smoothing=0.1 (6 epochs at 0.02): 91.23% against 91.48% without, so the paper's one-hot targets stay
    c.eval_crops = 2  # the paper's test reduced to 28 px: softmax averaged over the image and its reflection
    c.eval_every_steps = 2 * (60_000 // 64)  # every 2 epochs at batch 64, and after the last step: ~5-8 s each
    c.eval_batch_size = 64  # 64 x 2 views stay in the CPU's cache: 5.0 s per evaluation against 6.7 s at 256
    c.log_every_steps = 100
    return c
