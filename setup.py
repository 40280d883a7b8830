"""weakloc: weakly supervised object localization as a Beam pipeline.

This file is both the package definition (`pip install .` gives the `weakloc` command) and the
`--setup_file` that Beam ships to remote workers (Dataflow, Spark, Flink) so they import the same code.

The repository keeps the designed top level (`pipeline/`, `transforms/`, `models/`); they install as
`weakloc.pipeline`, `weakloc.transforms` and `weakloc.models` so that generic names such as `models`
never land at the top of a user's site-packages.
"""
import setuptools

PACKAGES = {
    "weakloc.pipeline": "pipeline",
    "weakloc.transforms": "transforms",
    "weakloc.models": "models",
    "weakloc.models.engines": "models/engines",
}

setuptools.setup(
    name="weakloc",
    version="0.1.0",
    description="Class Activation Map boxes from image-level labels, at scale, with Apache Beam.",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    # The ImageNet class names for `--model keras:NAME` travel with the code (no download at run time).
    package_data={"weakloc.models": ["imagenet_classes.tsv"], "weakloc.pipeline": ["templates/*.html"]},
    install_requires=[
        # Beam IO, RunInference and the portable runners; <3 because we lean on the 2.x ML API.
        "apache-beam>=2.60,<3",
        # Keras 3 is what TensorFlow ships from 2.16 on; weakloc needs its functional API and safe_mode.
        "tensorflow>=2.16",
        "keras>=3.0",
        # The default CPU engine (issue 14): a faster forward pass than TensorFlow's on MobileNetV2 (BENCHMARKS.md),
        # 180 MB, manylinux_2_28 wheels that install on Dataflow's Debian workers. --engine auto falls back to
        # TensorFlow where it is absent.
        "openvino>=2024.0",
        "pillow>=10.0",
        "numpy>=1.24",
        "pyarrow>=14",
        # Connected components: OpenCV labels a batch of maps 5-8x faster than scipy.ndimage.label (issue 6);
        # the headless wheel has no GUI libraries, so it installs on workers without X11. Never hand-written.
        "opencv-python-headless>=4.8",
        # find_objects boxes every component at once when a map splits into many (--boxes all).
        "scipy>=1.10",
        # CRC32C of TFRecord frames, in C; we read frames ourselves to survive damaged shards.
        "google-crc32c>=1.5",
        # weakloc export: YOLO data.yaml.
        "pyyaml>=5.4",
        # weakloc report: histograms (Agg backend, no display needed).
        "matplotlib>=3.6",
        # weakloc report: the page is a template with autoescape, so no run value can become markup.
        "jinja2>=3.0",
        # weakloc evaluate: COCO AP / AP50 / AR@100 by the reference implementation, never re-derived.
        "pycocotools>=2.0.6",
        # --boxes instances with a peak distance: watershed of touching objects from their separate peaks
        # (imported only there, so other workers never load it).
        "scikit-image>=0.22",
    ],
    extras_require={
        "gcp": ["apache-beam[gcp]>=2.60,<3"],
        # s3:// (AWS, MinIO, any S3-compatible store) through Beam's S3 filesystem.
        "aws": ["apache-beam[aws]>=2.60,<3"],
        # --engine litert: LiteRT's interpreter (XNNPACK), 2.3.0 installs here from manylinux wheels; the graph is
        # converted on the launcher with TensorFlow's own tf.lite converter, so workers need only this.
        "litert": ["ai-edge-litert>=1.2"],
        # The Dataflow translation test (--dry_run) needs the gcp extra, so CI installs it with the tests; it
        # also builds the --setup_file sdist in this environment, which needs setuptools (not in 3.12+ venvs).
        # tf-keras-vis and tensorflow-hub (imported by Beam's stock TF model handler) let the suite check that
        # the throughput benchmark, which compares against both, still runs.
        # moto's standalone server is a real S3 HTTP API the tests start on loopback (and on the namespaces
        # they make); Beam's aws extra is its S3 filesystem (boto3) that the cluster tests drive against it.
        # ai-edge-litert so the LiteRT engine's parity tests run rather than skip (21 MB).
        "test": ["pytest>=7", "hypothesis>=6.100", "apache-beam[gcp,aws]>=2.60,<3", "ai-edge-litert>=1.2",
                 "setuptools>=61", "tf-keras-vis>=0.8.7", "tensorflow-hub", "ruff>=0.5", "moto[server]>=5.0"],
    },
    # weakloc-worker-boot: the --container_executable of a Beam process worker pool (pipeline/worker_boot.py).
    entry_points={"console_scripts": ["weakloc=weakloc.pipeline.cli:main",
                                      "weakloc-worker-boot=weakloc.pipeline.worker_boot:main"]},
)
