"""The paper's data augmentation (Krizhevsky et al. 2012, sections 2 and 4.1) as TensorFlow ops for tf.data.

Every random choice is drawn from a stateless key, so an image's augmentation is a pure function of the key
(the input pipeline derives it from (seed, step, row)): restarting at a step reproduces it exactly.

- `decode_square`: rescale the shorter side to 256 and take the centre 256x256, decoding only that square
  of the JPEG (`tf.io.decode_and_crop_jpeg`); the paper's stored training images.
- `paper_train_image`: a random 224x224 (or Caffe's 227) patch of the square, a horizontal reflection half the
  time, and PCA lighting: `eigvec @ (alpha * eigval)` added to every pixel, alpha ~ N(0, 0.1) per image, with the
  training pixels' own RGB PCA (`pixel_pca`) or fb.resnet.torch's published one.
  `paper_batch`: the same for a whole batch of prepared 256x256 uint8 squares (`data.squares`);
  `paper_batch_on_device`: `paper_batch` in JAX, for the jitted train step (`config.augment_on_device`).
- `random_resized_crop`: Inception's random area/aspect crop, decoded in one step, for modern recipes.
- `ten_crops` / `centre_crop`: the paper's test patches (4 corners + centre, and their reflections).
- Normalisation: subtract the training set's per-pixel mean image (the paper) or per-channel mean / std.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from alexnet_jax.data.augment_jax import paper_batch_on_device  # noqa: F401 - the JAX half, TF-free

# ImageNet RGB PCA on [0, 1] pixels as published by facebookarchive/fb.resnet.torch (`config.pca='published'`);
# columns are eigenvectors. `config.pca='data'` computes the training set's own (`pixel_pca`).
PCA_EIGVAL = np.array([0.2175, 0.0188, 0.0045], np.float32)
PCA_EIGVEC = np.array(
    [[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]], np.float32
)


def resize(image: tf.Tensor, size: int, method: str) -> tf.Tensor:
    """A uint8 image to (size, size, 3) float32 on the 0-255 scale.

    'area' (default): box-filter averaging when shrinking (antialiased, and ~3x cheaper in TF than an
    antialiased bilinear), bilinear when enlarging; 'bilinear': plain bilinear (OpenCV/Caffe's
    convert_imageset); 'antialias': bilinear with an antialiasing kernel (PIL's BILINEAR).
    """
    if method == "area":
        shrink = tf.reduce_min(tf.shape(image)[:2]) >= size
        out = tf.cond(shrink, lambda: tf.image.resize(image, (size, size), method="area"),
                      lambda: tf.image.resize(image, (size, size), method="bilinear"))
    else:
        out = tf.image.resize(image, (size, size), method="bilinear", antialias=method == "antialias")
    return tf.clip_by_value(tf.ensure_shape(out, (size, size, 3)), 0.0, 255.0)


def decode_any(encoded: tf.Tensor) -> tf.Tensor:
    """Any image tfds stores (PNG, JPEG, GIF's first frame, BMP) as uint8 RGB: grayscale repeated, alpha dropped,
    16-bit scaled to 8. For datasets whose image feature is not JPEG (no partial decoding there)."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False, dtype=tf.uint8)
    image.set_shape([None, None, 3])
    return image


def image_shape(encoded: tf.Tensor, is_jpeg: bool = True) -> tf.Tensor:
    """(height, width, channels): a JPEG's from its header only; other formats decoded (the decode is shared)."""
    return tf.io.extract_jpeg_shape(encoded) if is_jpeg else tf.shape(decode_any(encoded))


def _square(jpeg: tf.Tensor, is_jpeg: bool = True) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """(top, left, side, width) of an image's centre square (a JPEG's read from its header only)."""
    shape = image_shape(jpeg, is_jpeg)
    h, w = shape[0], shape[1]
    side = tf.minimum(h, w)
    return (h - side) // 2, (w - side) // 2, side, w


def decode_window(jpeg: tf.Tensor, top: tf.Tensor, left: tf.Tensor, size: tf.Tensor, width: tf.Tensor,
                  is_jpeg: bool = True) -> tf.Tensor:
    """Pixels [top, top+size) x [left, left+size) of the JPEG, decoding only about those (other formats: all).

    libjpeg upsamples chroma at a crop's left and right edges as if they were the image's edges, so those
    columns can differ from a full decode; one more column on each side is decoded (where there is one) and
    dropped, which makes the window exactly the full decode's pixels.
    """
    if not is_jpeg:
        return decode_any(jpeg)[top : top + size, left : left + size]
    start = tf.maximum(left - 1, 0)
    stop = tf.minimum(left + size + 1, width)
    image = tf.io.decode_and_crop_jpeg(jpeg, tf.stack([top, start, size, stop - start]), channels=3)
    return image[:, left - start : left - start + size]


def decode_square(jpeg: tf.Tensor, size: int, method: str = "area", is_jpeg: bool = True) -> tf.Tensor:
    """The centre square of a JPEG resized to (size, size, 3) float32 on the 0-255 scale.

    Rescaling the shorter side then cropping the centre equals cropping the centre square then rescaling it;
    the second decodes only the square's pixels. Grayscale JPEGs come out as 3 equal channels.
    """
    top, left, side, width = _square(jpeg, is_jpeg)
    return resize(decode_window(jpeg, top, left, side, width, is_jpeg), size, method)


def decode_patch(jpeg: tf.Tensor, yx: tf.Tensor, resize_to: int, crop: int, method: str = "area",
                 is_jpeg: bool = True) -> tf.Tensor:
    """The crop x crop patch at offset yx of the (resize_to)^2 square, decoding only the patch's pixels.

    The patch is mapped back to the JPEG's own pixels (scale side / resize_to), decoded alone and resized
    to crop x crop: the same view as resizing the whole square and slicing it, up to half a source pixel of
    rounding, for about 3/4 of the decoding and resizing work.
    """
    top, left, side, width = _square(jpeg, is_jpeg)
    scale = tf.cast(side, tf.float32) / resize_to
    size = tf.maximum(1, tf.cast(tf.round(crop * tf.cast(side, tf.float32) / resize_to), tf.int32))
    size = tf.minimum(size, side)
    off = tf.minimum(tf.cast(tf.round(tf.cast(yx, tf.float32) * scale), tf.int32), side - size)
    return resize(decode_window(jpeg, top + off[0], left + off[1], size, width, is_jpeg), crop, method)


def crop_offsets(key: tf.Tensor, size: int, crop: int) -> tf.Tensor:
    """(y, x) uniform over all (size - crop + 1)^2 positions: 33x33 for 224 in 256."""
    return tf.random.stateless_uniform([2], seed=key, minval=0, maxval=size - crop + 1, dtype=tf.int32)


def flip_coin(key: tf.Tensor) -> tf.Tensor:
    """True half the time."""
    return tf.random.stateless_uniform([], seed=key) < 0.5


Lighting = tuple[np.ndarray, np.ndarray]  # (eigval (3,), eigvec (3, 3) with eigenvectors as columns), [0, 1] scale
PUBLISHED: Lighting = (PCA_EIGVAL, PCA_EIGVEC)


def pixel_pca(second_moment: np.ndarray, mean: np.ndarray) -> Lighting:
    """Eigenvalues (descending) and eigenvectors of the RGB covariance of pixels on the [0, 1] scale (the
    published set's scale), from the mean of x x^T and of x over pixels on the 0-255 scale. Each eigenvector's
    sign is chosen so that its largest component is positive (the shift's distribution does not depend on it)."""
    cov = (np.asarray(second_moment, np.float64) - np.outer(mean, mean)) / 255.0**2
    eigval, eigvec = np.linalg.eigh(cov)
    eigval, eigvec = eigval[::-1], eigvec[:, ::-1]
    eigvec = eigvec * np.where(eigvec[np.argmax(np.abs(eigvec), 0), range(3)] < 0, -1.0, 1.0)
    return np.maximum(eigval, 0).astype(np.float32), eigvec.astype(np.float32)


def pca_shift(key: tf.Tensor, std: float, pca: Lighting = PUBLISHED) -> tf.Tensor:
    """The paper's per-image RGB shift on the 0-255 scale: 255 * eigvec @ (alpha * eigval), alpha ~ N(0, std)."""
    eigval, eigvec = pca
    alpha = tf.random.stateless_normal([3], seed=key, stddev=std)
    return 255.0 * tf.linalg.matvec(tf.constant(eigvec, tf.float32), alpha * tf.constant(eigval, tf.float32))


def normalise(image: tf.Tensor, normalization: str, mean: np.ndarray, std: np.ndarray) -> tf.Tensor:
    """'pixel': image - mean image (mean already cropped like image); 'channel': (image - mean) / std."""
    if normalization == "pixel":
        return image - mean
    return (image - mean) / std


def paper_train_image(
    jpeg: tf.Tensor, key: tf.Tensor, *, resize: int, crop: int, flip: bool, pca_std: float,
    normalization: str, mean: np.ndarray, std: np.ndarray, method: str = "area", pca: Lighting = PUBLISHED,
    is_jpeg: bool = True,
) -> tf.Tensor:
    """Section 4.1: a random crop x crop patch of the 256 square, reflected half the time, PCA lighting.

    With 'pixel' normalisation `mean` is the (resize, resize, 3) mean image: the patch's own part of it is
    subtracted before the reflection, as if the mean had been subtracted from the square first.
    """
    k_crop, k_flip, k_pca = tf.unstack(tf.random.experimental.stateless_split(key, 3))
    yx = crop_offsets(k_crop, resize, crop)
    image = decode_patch(jpeg, yx, resize, crop, method, is_jpeg)
    if normalization == "pixel":
        image = image - tf.slice(tf.constant(mean), tf.stack([yx[0], yx[1], 0]), [crop, crop, 3])
    if flip:
        image = tf.cond(flip_coin(k_flip), lambda: tf.reverse(image, axis=[1]), lambda: image)
    if pca_std > 0:
        image = image + pca_shift(k_pca, pca_std, pca)
    if normalization == "channel":
        image = normalise(image, normalization, mean, std)
    return image


def batch_draws(key: tf.Tensor, rows: tf.Tensor, global_batch: int, size: int, crop: int,
                pca_std: float) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """`paper_batch`'s random choices for `rows` of a global batch, from the step's `key`: (y, x) offsets (B, 2)
    uniform over all (size - crop + 1)^2, reflections (B,) with probability 1/2, PCA alphas (B, 3) ~ N(0, pca_std).
    Row r takes row r of draws made for the whole global batch, so a row's choices depend on (seed, step, row),
    not on the process count."""
    k_crop, k_flip, k_pca = tf.unstack(tf.random.experimental.stateless_split(key, 3))
    yx = tf.random.stateless_uniform([global_batch, 2], seed=k_crop, minval=0, maxval=size - crop + 1, dtype=tf.int32)
    flips = tf.random.stateless_uniform([global_batch], seed=k_flip) < 0.5
    alpha = tf.random.stateless_normal([global_batch, 3], seed=k_pca, stddev=max(pca_std, 0.0))
    return tf.gather(yx, rows), tf.gather(flips, rows), tf.gather(alpha, rows)


def paper_batch(
    images: tf.Tensor, yx: tf.Tensor, flips: tf.Tensor, alpha: tf.Tensor, *, crop: int, flip: bool,
    pca_std: float, normalization: str, mean: np.ndarray, std: np.ndarray, pca: Lighting = PUBLISHED,
) -> tf.Tensor:
    """`paper_train_image` for a batch of stored uint8 squares (B, S, S, 3), or of their patches already cut at
    `yx` (B, crop, crop, 3), with the draws of `batch_draws`: the same distributions as `paper_train_image`.
    The patch and its part of the mean image are gathered with the same (reflected) indices, so the mean is
    subtracted as if before the reflection. Meant to run XLA-compiled: one pass over the pixels."""
    cols = tf.range(crop)[None]
    if flip:
        cols = tf.where(flips[:, None], crop - 1 - cols, cols)
    ys, xs = yx[:, :1] + tf.range(crop)[None], yx[:, 1:] + cols  # (B, crop) each
    if images.shape[1] == crop:  # patches: only the reflection
        patch = tf.gather(images, tf.broadcast_to(cols, tf.shape(xs)), axis=2, batch_dims=1)
    else:
        patch = tf.gather(tf.gather(images, ys, axis=1, batch_dims=1), xs, axis=2, batch_dims=1)
    image = tf.cast(patch, tf.float32)
    if normalization == "pixel":
        image = image - tf.gather(tf.gather(tf.constant(mean), ys), xs, axis=2, batch_dims=1)
    if pca_std > 0:
        eigval, eigvec = pca
        # eigvec @ (alpha * eigval) per image as products and a sum, not a matvec: inside this XLA-compiled function
        # TensorFlow's XLA:CPU hands a dot to YNNPACK, whose fusion thunk crashed (SIGSEGV in EmitYnnSubgraph) when
        # tf.data's threads ran the function at once (docs/notes/2026-12.md)
        shift = 255.0 * tf.reduce_sum(tf.constant(eigvec, tf.float32)[None]
                                      * (alpha * tf.constant(eigval, tf.float32))[:, None, :], axis=-1)
        image = image + shift[:, None, None, :]
    if normalization == "channel":
        image = normalise(image, normalization, mean, std)
    return image


def random_resized_crop(
    jpeg: tf.Tensor, key: tf.Tensor, *, crop: int, area_range: tuple[float, float],
    aspect_range: tuple[float, float], flip: bool, pca_std: float, normalization: str, mean: np.ndarray,
    std: np.ndarray, method: str = "area", pca: Lighting = PUBLISHED, is_jpeg: bool = True,
) -> tf.Tensor:
    """Inception-style: a random box of 8-100% of the area and 3/4-4/3 aspect, decoded alone, resized.

    Its crops do not line up with a mean image, so 'pixel' normalisation subtracts the mean image's per-channel
    average here (`mean` and `std` are per channel)."""
    k_box, k_flip, k_pca = tf.unstack(tf.random.experimental.stateless_split(key, 3))
    shape = image_shape(jpeg, is_jpeg)
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=k_box, min_object_covered=0.0,
        aspect_ratio_range=aspect_range, area_range=area_range, max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    window = tf.stack([begin[0], begin[1], size[0], size[1]])
    image = (tf.io.decode_and_crop_jpeg(jpeg, window, channels=3) if is_jpeg
             else decode_any(jpeg)[begin[0] : begin[0] + size[0], begin[1] : begin[1] + size[1]])
    image = resize(image, crop, method)
    if flip:
        image = tf.cond(flip_coin(k_flip), lambda: tf.reverse(image, axis=[1]), lambda: image)
    if pca_std > 0:
        image = image + pca_shift(k_pca, pca_std, pca)
    return image - mean if normalization == "pixel" else (image - mean) / std


def corner_offsets(size: int, crop: int) -> list[tuple[int, int]]:
    """Top-left, top-right, bottom-left, bottom-right, centre."""
    far, mid = size - crop, (size - crop) // 2
    return [(0, 0), (0, far), (far, 0), (far, far), (mid, mid)]


def centre_square(jpeg: tf.Tensor, is_jpeg: bool = True) -> tf.Tensor:
    """An image's uint8 centre square at its own size, decoding only that square of a JPEG."""
    top, left, side, width = _square(jpeg, is_jpeg)
    return decode_window(jpeg, top, left, side, width, is_jpeg)


def eval_view(square: tf.Tensor, *, resize_to: int, crop: int, crops: int, normalization: str, mean: np.ndarray,
              std: np.ndarray, method: str = "area") -> tf.Tensor:
    """A uint8 centre square (any side) resized to `resize_to`, normalised, then its centre crop (crops=1, shape
    (crop, crop, 3)) or the paper's 10 patches (crops=10, (10, crop, crop, 3)): 4 corners + centre, reflected."""
    image = normalise(resize(square, resize_to, method), normalization, mean, std)
    if crops == 1:
        return centre_crop(image, crop)
    return ten_crops(image, crop)


def eval_image(
    jpeg: tf.Tensor, *, resize: int, crop: int, crops: int, normalization: str, mean: np.ndarray, std: np.ndarray,
    method: str = "area", is_jpeg: bool = True,
) -> tf.Tensor:
    """`eval_view` of an encoded image's centre square (decode_square's pixels, then the same ops)."""
    return eval_view(centre_square(jpeg, is_jpeg), resize_to=resize, crop=crop, crops=crops,
                     normalization=normalization, mean=mean, std=std, method=method)


def eval_batch(squares: tf.Tensor, *, crop: int, crops: int, normalization: str, mean: np.ndarray,
               std: np.ndarray) -> tf.Tensor:
    """`eval_image` for a batch of stored uint8 squares (B, S, S, 3): (B, crop, crop, 3) or (B, 10, crop, crop, 3)."""
    images = normalise(tf.cast(squares, tf.float32), normalization, mean, std)
    five = [images[:, y : y + crop, x : x + crop] for y, x in corner_offsets(squares.shape[1], crop)]
    if crops == 1:
        return five[4]
    return tf.stack(five + [tf.reverse(p, axis=[2]) for p in five], axis=1)


def centre_crop(square: tf.Tensor, crop: int) -> tf.Tensor:
    y, x = corner_offsets(square.shape[0], crop)[4]
    return square[y : y + crop, x : x + crop]


def ten_crops(square: tf.Tensor, crop: int) -> tf.Tensor:
    five = [square[y : y + crop, x : x + crop] for y, x in corner_offsets(square.shape[0], crop)]
    return tf.stack(five + [tf.reverse(p, axis=[1]) for p in five])
