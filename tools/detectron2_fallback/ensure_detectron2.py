#!/usr/bin/env python
"""Find a working detectron2, or build the CPU fallback wheel of detectron2 v0.6.

detectron2 is not on PyPI. On a machine without a GPU toolchain we install the Python
sources of the official v0.6 release, taken from PyPI's ``pb1-detectron2==0.6`` sdist
(identical Python files, but no C++ sources, so its own setup.py cannot build), as a real
distribution named ``detectron2`` with version ``0.6+nocompiledops``. Nothing in
detectron2's own files is edited: the wheel adds one module of ours, ``detectron2/_C.py``
(see ``_C.py`` beside this file), which stands in for the compiled ops and raises a clear
error when one is used. The versions v0.6 needs (Pillow<10, numpy<1.24, setuptools<81)
are requirements of that wheel only, so they never touch a user's own detectron2 install.

Usage (run with the interpreter of the environment being set up):
    python ensure_detectron2.py status     # prints: compiled | fallback | missing | broken: ...
    python ensure_detectron2.py build DIR  # builds the fallback wheel into DIR, prints its path
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST_NAME = "pb1-detectron2"
SDIST_VERSION = "0.6"
SDIST_FILE = f"{SDIST_NAME}-{SDIST_VERSION}.tar.gz"
# sha256 of the sdist on PyPI: the fallback installs exactly these files or nothing.
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
FALLBACK_VERSION = "0.6+nocompiledops"

# detectron2 v0.6's own install_requires, with the pins that v0.6 needs on today's packages.
FALLBACK_REQUIRES = [
    "Pillow>=7.1,<10",  # v0.6 uses Image.LINEAR etc., removed in Pillow 10
    "numpy<1.24",  # v0.6 uses np.int (data/build.py), removed in numpy 1.24
    "setuptools<81",  # v0.6 imports pkg_resources, removed in setuptools 81
    "matplotlib",
    "pycocotools>=2.0.2",
    "termcolor>=1.1",
    "yacs>=0.1.8",
    "tabulate",
    "cloudpickle",
    "tqdm>4.29.0",
    "tensorboard",
    "fvcore>=0.1.5,<0.1.6",
    "iopath>=0.1.7,<0.1.10",
    "future",
    "pydot",
    "omegaconf>=2.1",
    "hydra-core>=1.1",
    "black",  # v0.6 pins black==21.4b2, which fails to import with current click
]

# v0.6's setup.py installs these projects as detectron2.projects.*.
PROJECTS = {
    "point_rend": "projects/PointRend/point_rend",
    "deeplab": "projects/DeepLab/deeplab",
    "panoptic_deeplab": "projects/Panoptic-DeepLab/panoptic_deeplab",
}

SETUP_PY = """\
# Written by scalenet_d2's tools/detectron2_fallback: packages detectron2 v0.6's Python
# sources (from the {sdist} sdist) without compiled ops.
from setuptools import find_packages, setup

setup(
    name="detectron2",
    version="{version}",
    author="FAIR (packaged without compiled ops by scalenet_d2)",
    url="https://github.com/facebookresearch/detectron2",
    description="detectron2 v0.6 Python sources, CPU-only fallback without compiled ops",
    license="Apache-2.0",
    packages=find_packages(),
    package_data={{"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]}},
    python_requires=">=3.7",
    install_requires={requires!r},
)
"""


def status() -> str:
    """What detectron2 the running interpreter has."""
    try:
        import detectron2  # noqa: F401
    except ImportError:
        return "missing"
    try:
        from detectron2 import _C
    except ImportError as e:
        return (
            f"broken: detectron2 at {os.path.dirname(detectron2.__file__)} imports, but its compiled ops do not ({e})"
        )
    return "fallback" if getattr(_C, "SCALENET_D2_FALLBACK", False) else "compiled"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_sdist(cache_dir: Path) -> Path:
    """The verified sdist, downloaded once into cache_dir through pip (its index settings apply)."""
    sdist = cache_dir / SDIST_FILE
    if sdist.is_file() and _sha256(sdist) == SDIST_SHA256:
        return sdist
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        # Hash-checking mode: pip verifies the archive's sha256 as it downloads it, before it runs
        # any of its code (preparing an sdist's metadata runs its setup.py, which imports torch:
        # --no-build-isolation lets it see this environment's torch).
        requirement = Path(tmp) / "requirement.txt"
        requirement.write_text(f"{SDIST_NAME}=={SDIST_VERSION} --hash=sha256:{SDIST_SHA256}\n")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--no-build-isolation",
                "--require-hashes",
                "-d",
                tmp,
                "-r",
                str(requirement),
            ],
            check=True,
            stdout=sys.stderr,  # our stdout carries only the result
        )
        got = Path(tmp) / SDIST_FILE
        if not got.is_file():
            sys.exit(f"pip download did not produce {SDIST_FILE} in {tmp}")
        digest = _sha256(got)
        if digest != SDIST_SHA256:
            sys.exit(f"{SDIST_FILE}: sha256 {digest} does not match the expected {SDIST_SHA256}")
        os.replace(got, sdist)
    return sdist


def _own_files_digest() -> str:
    """sha256 of the files that make the fallback wheel (this builder and _C.py)."""
    h = hashlib.sha256()
    for path in (Path(__file__), Path(__file__).with_name("_C.py")):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def build_wheel(out_dir: Path, cache_dir: Path) -> Path:
    # one folder per version of our own files: a change to them builds a new wheel
    out_dir = out_dir / _own_files_digest()
    built = sorted(out_dir.glob(f"detectron2-{FALLBACK_VERSION}-*.whl"))
    if built:
        return built[-1]
    sdist = fetch_sdist(cache_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        src = Path(tmp) / f"{SDIST_NAME}-{SDIST_VERSION}"
        build = Path(tmp) / "build"
        shutil.copytree(src / "detectron2", build / "detectron2")
        for name, rel in PROJECTS.items():
            shutil.copytree(src / rel, build / "detectron2" / "projects" / name)
        shutil.copy(src / "LICENSE", build / "LICENSE")
        shutil.copy(Path(__file__).with_name("_C.py"), build / "detectron2" / "_C.py")
        (build / "setup.py").write_text(
            SETUP_PY.format(sdist=SDIST_FILE, version=FALLBACK_VERSION, requires=FALLBACK_REQUIRES)
        )
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out_dir), str(build)],
            check=True,
            stdout=sys.stderr,
        )
    wheels = sorted(out_dir.glob(f"detectron2-{FALLBACK_VERSION}-*.whl"))
    if not wheels:
        sys.exit(f"no detectron2 wheel was written to {out_dir}")
    return wheels[-1]


def main(argv):
    if argv[:1] == ["status"]:
        print(status())
    elif argv[:1] == ["build"] and len(argv) == 2:
        cache = Path(os.environ.get("SCALENET_D2_CACHE", Path.home() / ".cache" / "scalenet_d2"))
        print(build_wheel(Path(argv[1]).resolve(), cache / "detectron2-fallback"))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
