"""Installable package for the video-to-audio data pipeline and trainer (see README.md)."""
from setuptools import find_packages, setup

CORE = [
    "numpy>=2.0,<3",
    "av>=14,<20",
    "soxr>=0.5,<2",
    "soundfile>=0.12,<1",
    "librosa>=0.11,<0.12",  # AV-Align reference numbers were produced with librosa 0.11
    "opencv-python-headless>=4.10,<6",
    "pyarrow>=18,<26",
    "pandas>=2.2,<4",
    "tqdm>=4.66,<5",
    "threadpoolctl>=3.1,<4",  # caps BLAS/OpenMP threads per worker (core/native_threads.py)
    "matplotlib>=3.8,<4",
    "scipy>=1.11,<2",  # Student's t for the listening test's intervals; tests check FD against sqrtm
    "torch>=2.4",  # install the CPU build first (see Makefile) so pip does not pull CUDA
    "transformers>=4.46,<6",
    "diffusers>=0.31,<1",
    "safetensors>=0.4,<1",
    "webdataset>=0.2.100,<2",
    "fsspec>=2024.6",
    "aiohttp>=3.9,<4",  # fsspec's http(s) backend: shards and index.json read from a web server
    "tensorboard>=2.16,<3",
    "silero-vad>=6.2,<7",  # speech detector; its wheel ships the weights (no download)
    "onnxruntime>=1.20,<2",  # runs Silero's sequence VAD model (one call per 16 s instead of per 32 ms)
    "scenedetect-headless>=0.7,<0.8",  # scene cuts on the decoded frames
]
RAY = ["ray[data]==2.60.*"]
BEAM = ["apache-beam==2.77.*"]
S3 = ["s3fs>=2024.6"]  # s3:// roots, shard outputs and training streams (any S3-compatible store)
# selenium below 4.52, whose certifi pin is newer than the package index has
TEST = ["pytest>=8,<10", "pytest-timeout>=2.3,<3", "import-linter>=2.1,<3", "selenium>=4.30,<4.52",
        "moto[server]>=5.1,<6"]  # a real S3 server on loopback for the object-storage tests

setup(
    name="v2a-datapipe",
    version="0.1.0",
    description="Curation, augmentation and feature sharding of video-to-audio training data, "
    "plus a distributed VTA-LDM trainer",
    python_requires=">=3.10",
    packages=find_packages(include=["core*", "pipeline*", "filters*", "augment*", "shards*", "metrics*", "train*"]),
    package_data={"train": ["configs/*.json", "listening_test.html"], "core": ["registry.json"]},
    install_requires=CORE,
    extras_require={"ray": RAY, "beam": BEAM, "s3": S3, "test": TEST, "all": RAY + BEAM + S3 + TEST},
)
