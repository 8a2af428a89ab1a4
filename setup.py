#!/usr/bin/env python
import re

from setuptools import find_packages, setup


def get_version():
    """The version, defined once: scalenet_d2/__init__.py's __version__."""
    with open("scalenet_d2/__init__.py", encoding="utf-8") as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


setup(
    name="scalenet_d2",
    version=get_version(),
    description="ScaleNet (Li et al., CVPR 2019) backbones for detectron2",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.8",
    packages=find_packages(include=["scalenet_d2", "scalenet_d2.*"]),
    # model_zoo/configs links to the repository's configs/: a wheel holds a copy (scalenet_d2.model_zoo)
    package_data={
        "scalenet_d2": ["allocations/*.json", "allocations/*.md"],
        "scalenet_d2.model_zoo": ["configs/*.yaml", "configs/**/*.yaml", "configs/**/*.py"],
    },
    # detectron2 is deliberately absent: it is not on PyPI, GPU users build it from source
    # for their CUDA, and tools/setup_env.sh installs a CPU fallback only where none exists.
    install_requires=[
        "torch>=2.6",  # torch.library.custom_op and torch.compiler.is_exporting (exporting, scalenet.py)
        "torchvision>=0.18",
        "fvcore>=0.1.5",
        "pycocotools>=2.0.2",
        # Headless build: the same OpenCV without the system GL/X11 libraries (libGL.so.1)
        # that opencv-python needs and a bare server often lacks.
        "opencv-python-headless",
        "numpy",
        "matplotlib>=3.3",
        "submitit>=1.5",  # tools/study.py: SLURM jobs with requeue, and the same jobs on this machine
        "scipy",  # Student's t for the intervals of tools/compare.py (utils/statistics.py)
    ],
    extras_require={
        # onnx, onnxruntime: the ONNX export and its check against eager (tests/test_export.py);
        # pytest-xdist: make test runs the suite on every core
        "dev": ["pytest>=7", "pytest-timeout", "pytest-xdist", "ruff==0.17.6", "onnx", "onnxruntime"],
    },
)
