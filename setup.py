"""Packaging for the Scale-MAE reference implementation.

The project keeps MAE's flat layout (``main_pretrain.py``, ``models_mae.py``, ...), so the top-level scripts
are installed as py_modules next to the ``util`` and ``dataloaders`` packages; after ``pip install -e .`` every
module imports from any working directory.
"""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

setup(
    name="scalemae",
    version="0.1.0",
    description="Scale-MAE: a scale-aware masked autoencoder for multiscale geospatial representation learning "
    "(reference reimplementation)",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    py_modules=[
        "models_mae",
        "models_vit",
        "main_pretrain",
        "main_linprobe",
        "engine_pretrain",
        "engine_finetune",
        "models_seg",
        "main_segment",
        "engine_segment",
        "main_eval",
        "main_embed",
        "main_predict",
    ],
    packages=find_packages(include=["harness", "harness.*", "util", "util.*", "dataloaders", "dataloaders.*", "layers",
                                    "layers.*", "evaluation", "evaluation.*",
                                    "inference", "inference.*"]),
    package_data={"": ["*.yaml"]},
    install_requires=[
        "torch>=2.3",
        "torchvision>=0.18",
        "timm>=1.0,<2",
        "numpy",
        "pyyaml",
        "pillow",
        "tensorboard",
        "rasterio>=1.3",
        "shapely>=2.0",
        "geopandas>=0.14",
        "pyarrow>=14",  # GeoParquet (main_embed.py)
        "tqdm",
        "matplotlib",
        "safetensors",
        "scikit-learn",
    ],
    extras_require={
        "dev": ["pytest>=7", "pytest-timeout", "hypothesis>=6"],
        "gdal": ["gdal"],
    },
)
