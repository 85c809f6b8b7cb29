"""Every config key with its default; files under `configs/` start from `get_config()` and change a few.

Names follow flax's ImageNet example where one exists (`batch_size`, `num_epochs`, `num_train_steps`,
`learning_rate`, `momentum`, ...). Override any of them on the command line: `--config.batch_size=64`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    # Data.
    c.dataset = "imagenet2012"  # 'fashion_mnist', 'imagenet2012', 'cifar10'
    c.data_dir = ""  # where tfds keeps prepared datasets, as for tfds.load; '' = tfds's default
    c.fashion_mnist_dir = "/usr/share/datasets/fashion-mnist"  # the IDX files (Debian: dataset-fashion-mnist)
    c.image_size = 224  # train/eval crop; the paper says 224 (cuda-convnet pads conv1 to 55x55), Caffe 227
    c.num_classes = 1000
    c.crop_padding = 0  # small images: zero-pad by this many pixels, then take a random crop back
    c.random_flip = True  # horizontal reflections
    c.shuffle_buffer = 0  # unused by in-memory datasets (they take a full per-epoch permutation)

    # Model (alexnet_jax.models.AlexNet).
    c.model = "AlexNet"
    c.variant = "paper"  # 'paper' (2012), 'owt' (torchvision / one weird trick), 'small' (28-32 px)
    c.norm = ""  # 'lrn', 'batchnorm', 'none'; '' = the variant's own (paper: lrn)
    c.groups = 0  # 1 or 2; 0 = the variant's own (paper: 2)
    c.init_scheme = "paper"  # 'paper': N(0, 0.01), bias 1 in conv2/4/5, fc6/7; 'he'
    c.widths = ()  # override the five conv widths; () = the variant's
    c.fc_width = 0  # override fc6/fc7 width; 0 = the variant's
    c.dropout_rate = 0.5
    c.dtype = "float32"  # compute dtype: 'float32' or 'bfloat16' (params stay float32)

    # Optimisation (the paper's section 5).
    c.batch_size = 128  # global, across all devices and processes
    c.num_epochs = 90.0
    c.num_train_steps = -1  # -1: from num_epochs
    c.learning_rate = 0.01
    c.momentum = 0.9
    c.nesterov = False
    c.weight_decay = 5e-4
    c.lr_schedule = "plateau"  # 'plateau' (paper), 'step', 'cosine', 'constant'
    c.lr_decay_factor = 0.1  # plateau and step: multiply the learning rate by this
    c.lr_step_epochs = (30.0, 60.0, 80.0)  # step schedule boundaries
    c.warmup_epochs = 0.0  # cosine schedule
    c.plateau_patience = 2  # evaluations without improvement before dividing by 10
    c.plateau_rtol = 1e-3
    c.plateau_cooldown = 0
    c.plateau_max_reductions = 3  # the paper divided 3 times

    # Evaluation and logging.
    c.eval_batch_size = 256
    c.eval_every_steps = -1  # -1: once per epoch
    c.log_every_steps = 100
    c.mesh_shape = (-1, 1)  # ('data', 'model'); -1 fills the remaining devices
    c.eval_crops = 1  # crops per evaluation image: 1 (centre) or 10 (the paper's corners + centre, flipped)

    # Checkpoints (alexnet_jax.checkpointing): orbax, under WORKDIR/checkpoints/; rerunning resumes.
    c.checkpoint_every_steps = 1000  # also saved at the end and on SIGTERM/preemption; 0: only those
    c.checkpoint_keep = 3  # keep the latest this many checkpoints
    c.checkpoint_keep_best = 1  # and the best this many by validation top-1 (0: none); saves at each eval
    c.checkpoint_async = True  # write in a background thread while training goes on
    return c
