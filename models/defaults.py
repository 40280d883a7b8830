"""Defaults and limits, each with its reason: the one place a number that a user can change is set.

Commands, transforms and the maths import them from here, so a flag's default, its help text and the code that
applies it cannot drift apart.
"""
from __future__ import annotations

# A decompression bomb (a few KB of PNG that claims 50,000 x 50,000 pixels) must be refused before Pillow
# allocates it. 100 MP covers every camera and scanner we expect (a 108 MP phone sensor is the outlier,
# documented); at 3 bytes a pixel the worst accepted image costs 300 MB while it is being decoded.
MAX_PIXELS = 100_000_000

# An image file larger than this is refused from its listed size; the biggest real photos (100 MP TIFF, 16-bit)
# stay below it, and a worker can afford to hold one such file while it decodes.
MAX_FILE_BYTES = 512 * 1024 * 1024

# Decoding ahead of the forward pass (issue 6). Pillow releases the GIL while it decodes and resizes, as TensorFlow
# does while it runs a batch, so a small pool decodes the next images while the bundle's thread runs the model on
# the current batch; with two batches in flight, one is ready (or nearly) whenever BatchElements hands one to the
# model. It pays where the model leaves CPU idle (a GPU worker, more cores than TensorFlow keeps busy); on the
# 2-core benchmark machine, where TensorFlow already uses both cores, the gain is within the noise (BENCHMARKS.md).
DECODE_THREADS = 2
DECODE_WINDOW = 64

# Images per forward pass: large enough that per-call overhead vanishes next to a MobileNet-class model's work,
# small enough that a 224x224 batch and its feature maps stay far below a worker's memory (BENCHMARKS.md measures
# batch 8 to 64; the best differs by host by under 20%).
BATCH_SIZE = 32
# calibrate runs one model on a few hundred images in one process: bigger batches, fewer calls.
CALIBRATE_BATCH_SIZE = 64

# One predicted class per image: what "Top-1 Loc" scores, and the box a detector most often wants.
TOP_K = 1

# The CAM threshold with no calibration: the CAM paper's 0.2 of the map's maximum (Zhou et al. 2016, section 3).
CAM_THRESHOLD = 0.2

# --boxes all|union: components below 1% of the image are speckle of a map upsampled 8-32x, not objects.
MIN_BOX_AREA = 0.01

# calibrate: a class gets its own threshold only with at least this many boxed images; fewer overfit the sweep
# (on the fruit photos, 5 images moved a class's threshold by 0.2 from the overall one).
MIN_PER_CLASS = 10
# calibrate: a class's threshold is pulled towards the overall one as if this many more images had chosen it, so
# one fitted on 10 images moves only half-way from the overall choice (issue 15).
THRESHOLD_SHRINK = 10.0
