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
    c.learning_rate = 0.01
    c.momentum = 0.9
    c.weight_decay = 5e-4
    c.lr_schedule = "plateau"
    c.lr_decay_factor = 0.1
    c.plateau_max_reductions = 3
    c.eval_batch_size = 250
    c.log_every_steps = 100
    return c
