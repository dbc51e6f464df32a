"""Packaging without importing torch.

The C++/CUDA sources in csrc/ ship inside the package as ``fastcnn.csrc`` (for non-editable
installs) and are compiled just in time on first use by ``fastcnn._extension`` against the torch
that is installed then, so the build needs no torch and pip's build isolation cannot pick a second
one. ``python -m fastcnn.build`` compiles them ahead of time.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["fastcnn", "fastcnn.*"]), "fastcnn.csrc"],
    package_dir={"fastcnn.csrc": "csrc"},
    # every source and header (tests/test_extension.py checks that none is left out)
    package_data={
        "fastcnn.csrc": [
            "*.cpp",
            "*.h",
            "common/*.h",
            "cpu/*.cpp",
            "cpu/*.h",
            "cuda/*.cu",
            "cuda/*.cuh",
            "cuda/*.h",
        ]
    },
    include_package_data=False,
)
