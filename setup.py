#!/usr/bin/env python
from setuptools import find_packages, setup

setup(
    name="scalenet_d2",
    version="0.1.0",
    description="ScaleNet (Li et al., CVPR 2019) backbones for detectron2",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.8",
    packages=find_packages(include=["scalenet_d2", "scalenet_d2.*"]),
    package_data={"scalenet_d2": ["allocations/*.json", "allocations/*.md"]},
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
        # onnx, onnxruntime: the ONNX export and its check against eager (tests/test_export.py)
        "dev": ["pytest>=7", "pytest-timeout", "ruff==0.17.6", "onnx", "onnxruntime"],
    },
)
