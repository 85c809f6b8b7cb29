"""The paper's recipe (Krizhevsky et al. 2012, section 5) on ILSVRC-2012 through tfds's imagenet2012."""

from alexnet_jax import default_config


def get_config():
    c = default_config.get_config()
    c.dataset = "imagenet2012"
    c.image_size = 224
    c.num_classes = 1000
    c.variant = "paper"
    c.init_scheme = "paper"
    c.batch_size = 128
    c.num_epochs = 90.0
    c.learning_rate = 0.01  # at the paper's batch 128, scaled linearly for other batch sizes (docs/paper.md):
    c.lr_reference_batch = 128  # batch 16 trains at 0.00125; at 0.01 it diverges, in PyTorch too
    c.momentum = 0.9
    c.weight_decay = 5e-4
    c.lr_schedule = "plateau"
    c.lr_decay_factor = 0.1
    c.plateau_max_reductions = 3
    c.eval_batch_size = 200  # 50,000 validation images: 250 batches (the last padded only if processes don't divide)
    # Data (section 4.1): shorter side 256, centre 256 square, random 224 patches (conv1 pads 3 px to 55x55),
    # reflections, PCA lighting alpha ~ N(0, 0.1), minus the training mean image; test on the 10 patches.
    c.resize_size = 256
    c.train_crop = "paper"
    c.random_flip = True
    c.pca_lighting = 0.1
    c.pca = "data"  # the training pixels' own RGB PCA, as the paper; 'published': fb.resnet.torch's constants
    c.normalization = "pixel"
    c.eval_crops = 10
    c.log_every_steps = 100
    return c
