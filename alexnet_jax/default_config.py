"""Every config key with its default; files under `configs/` start from `get_config()` and change a few.

Names follow flax's ImageNet example where one exists (`batch_size`, `num_epochs`, `num_train_steps`,
`learning_rate`, `momentum`, ...). Override any of them on the command line: `--config.batch_size=64`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    # Data.
    # 'imagenet2012' (manual tars), 'folder' (your images: `folder`), any tfds dataset's name (e.g.
    # 'oxford_flowers102': streamed like ImageNet), or the in-memory 'fashion_mnist', 'cifar10'
    c.dataset = "imagenet2012"
    c.data_dir = ""  # where tfds keeps prepared datasets, as for tfds.load; '' = tfds's default
    c.folder = ""  # dataset='folder': ROOT/<split>/<class>/** (or ROOT/<class>/**) images, prepared once
    # Splits in tfds syntax ('train', 'train[:90%]', 'test[:1000]'); '' = 'train' and, for photos, the dataset's
    # 'validation' (else 'test', else a folder's other split, else holdout_fraction of 'train'); fashion_mnist and
    # cifar10: 'train' and 'test'
    c.train_split = ""
    c.eval_split = ""
    # A multi-process run: process 0 prepares a missing dataset (or statistics cache), the others wait this long
    c.prepare_wait_s = 7200.0
    c.holdout_fraction = 0.1  # with no evaluation split: the last fraction of the training records, held out
    c.image_key = ""  # a tfds dataset's image / label features; '' = its supervised keys
    c.label_key = ""
    c.fashion_mnist_dir = "/usr/share/datasets/fashion-mnist"  # the IDX files (Debian: dataset-fashion-mnist)
    c.image_size = 224  # train/eval crop; the paper says 224 (cuda-convnet pads conv1 to 55x55), Caffe 227
    c.num_classes = 1000  # 0: the dataset's class count
    c.crop_padding = 0  # small images: zero-pad by this many pixels, then take a random crop back
    c.random_flip = True  # horizontal reflections
    # (every dataset's training stream is a per-epoch permutation of its records, read by index: data/records.py)
    # ImageNet (alexnet_jax.data.imagenet / augment; docs/imagenet.md). Paper values; each one can be switched.
    # folder with ILSVRC2012_img_train.tar + _val.tar (imagenet2012) or cifar-10-binary.tar.gz (cifar10, offline);
    # '' = tfds's <data_dir>/downloads/manual
    c.manual_dir = ""
    c.resize_size = 256  # shorter side rescaled to this and the centre square kept (paper: 256)
    c.resize_method = "area"  # 'area' (box filter when shrinking), 'bilinear' (Caffe/OpenCV), 'antialias' (PIL)
    c.train_crop = "paper"  # 'paper': random image_size patch of the square; 'random_resized': Inception-style
    c.rrc_area_range = (0.08, 1.0)  # random_resized: fraction of the image area
    c.rrc_aspect_range = (0.75, 4.0 / 3.0)  # random_resized: width / height
    c.pca_lighting = 0.1  # std of the per-image PCA colour alpha (paper: 0.1); 0 turns it off
    # whose RGB PCA the lighting uses: 'data' (the paper, section 4.1): the eigenvalues/vectors of the training
    # pixels' colour covariance, computed with the mean image; 'published': fb.resnet.torch's ImageNet constants
    c.pca = "data"
    c.normalization = "pixel"  # 'pixel': subtract the training mean image (paper); 'channel': mean/std per channel
    # Read ImageNet prepared once as the paper's resize_size squares (python -m alexnet_jax.data.prepare; the
    # data/squares.py tfds dataset) instead of decoding the source JPEGs at every step; 'raw' uint8 or 'jpeg'.
    c.prepared = False
    c.prepared_format = "raw"
    c.prepared_quality = 95  # prepared_format='jpeg': the JPEG quality the squares are stored at
    # prepared=True: the host ships the uint8 squares and the random draws; the crop, reflection, mean image and
    # PCA lighting run inside the jitted train step (the same batches; fewer host cores, a little device time)
    c.augment_on_device = False
    c.stats_examples = 50_000  # training images averaged for the mean image / channel stats (0: all)
    # normalization='channel' with fixed per-channel statistics on the 0-255 scale instead of the training set's,
    # e.g. torchvision's ImageNet mean/std x 255 for converted weights (alexnet_jax.convert); () = computed
    c.channel_mean = ()
    c.channel_std = ()

    # Model (alexnet_jax.model.AlexNet).
    c.variant = "paper"  # 'paper' (2012), 'owt' (torchvision / one weird trick), 'small' (28-32 px)
    c.norm = ""  # 'lrn', 'batchnorm', 'none'; '' = the variant's own (paper: lrn)
    c.groups = 0  # 1 or 2; 0 = the variant's own (paper: 2)
    c.init_scheme = "paper"  # 'paper': N(0, 0.01), bias 1 in conv2/4/5, fc6/7; 'he'
    c.widths = ()  # override the five conv widths; () = the variant's
    c.fc_width = 0  # override fc6/fc7 width; 0 = the variant's
    c.dropout_rate = 0.5
    c.dtype = "float32"  # compute dtype: 'float32' (CPUs) or 'bfloat16' (GPUs/TPUs; params stay float32)
    # How LRN and max-pooling are differentiated (the same function either way; docs/benchmarks.md):
    # 'cpu_tuned' (LRN with a hand-written VJP, max-pooling as two 1-D passes: alexnet_jax/model/ops.py),
    # 'native' (XLA's own reduce_window and autodiff), 'auto' (cpu_tuned on the CPU backend, native on GPU/TPU).
    c.kernels = "auto"

    # Transfer (alexnet_jax/pretrained.py, docs/photos.md). init_from: a torchvision AlexNet state dict (.pth),
    # an alexnet_jax workdir (its latest checkpoint) or a WORKDIR/checkpoints/<step> directory; at step 0 every
    # parameter whose name and shape match is loaded, the rest (e.g. fc8 for another class count) initialised.
    c.init_from = ""
    # the input normalisation with init_from: 'pretrained' (the weights' own: torchvision's mean/std, or the
    # checkpoint's record) or 'data' (computed from the new training images)
    c.init_normalisation = "pretrained"
    c.frozen = ""  # regex over layer names or 'layer/param' paths that get no update, e.g. 'conv.*' or 'conv.*|fc6'

    # Optimisation (the paper's section 5).
    c.batch_size = 128  # global, across all devices and processes
    c.num_epochs = 90.0
    c.num_train_steps = -1  # -1: from num_epochs
    c.learning_rate = 0.01
    # learning_rate is the rate at this global batch size; another batch size scales it linearly (Goyal et al.
    # 2017; flax's ImageNet example does the same at 256). 0: learning_rate is used as given whatever the batch.
    c.lr_reference_batch = 0
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
    c.label_smoothing = 0.0  # > 0: targets (1 - x) one-hot + x / classes (Szegedy et al. 2016); paper: 0

    # Evaluation and logging.
    c.eval_batch_size = 256
    c.eval_every_steps = -1  # -1: once per epoch
    c.log_every_steps = 100
    c.mesh_shape = (-1, 1)  # ('data', 'model'); -1 fills the remaining devices
    # Views per evaluation image, softmax averaged: 1 (centre); 2 (the whole image and its reflection: the paper's
    # test reduced to images no larger than the crop); 10 (imagenet2012: 4 corners + centre, and reflections).
    c.eval_crops = 1

    # Parallelism (alexnet_jax/sharding.py, docs/sharding.md).
    # 'paper': the 2012 two-GPU split over the 'model' axis (each device holds 1/model of every conv's kernels
    # and every FC layer's neurons; conv2/4/5 stay on their device); 'owt': Krizhevsky 2014's "one weird
    # trick" (data-parallel convs over all devices, split FC layers); 'data_parallel': nothing split, the batch
    # over every device. With a 'model' axis of 1 all three are plain data parallelism.
    c.sharding = "paper"
    # Multi-process (multi-host) runs: jax.distributed.initialize before any other JAX call.
    # 'auto': when coordinator_address or JAX_COORDINATOR_ADDRESS is set, or the environment is a multi-process
    # job (multi-host Cloud TPU, SLURM with several tasks, Open MPI); 'on': always (jax detects the cluster);
    # 'off': never.
    c.distributed = "auto"
    c.coordinator_address = ""  # 'host:port' of process 0; '' = JAX_COORDINATOR_ADDRESS or cluster detection
    c.num_processes = 0  # 0 = JAX_NUM_PROCESSES or cluster detection
    c.process_id = -1  # -1 = JAX_PROCESS_ID or cluster detection
    c.cpu_collectives = "gloo"  # how CPU devices of different processes talk (jax_cpu_collectives_implementation)

    # Checkpoints (alexnet_jax.checkpointing): orbax, under WORKDIR/checkpoints/; rerunning resumes.
    c.checkpoint_every_steps = 1000  # also saved at the end and on SIGTERM/preemption; 0: only those
    c.checkpoint_keep = 3  # keep the latest this many checkpoints
    c.checkpoint_keep_best = 1  # and the best this many by validation top-1 (0: none); saves at each eval
    c.checkpoint_async = True  # write in a background thread while training goes on
    return c
