"""ldct_jax: JAX/Flax low-dose CT and MRI denoising and reconstruction."""
from setuptools import find_packages, setup

# Versions are pinned to the stack the code and its numbers were checked on;
# JAX/Flax/orbax APIs move fast, and unpinned installs silently change results.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "ml-collections==1.1.0",
    "absl-py>=2.1",
    "numpy>=1.26",
    "scipy>=1.11",
    "scikit-image==0.26.0",
    "pydicom==3.0.2",
    "h5py>=3.10",
    "tensorboardX==2.6.5",
    "tqdm>=4.66",
    "pillow>=10",
]

setup(
    name="ldct_jax",
    version="0.1.0",
    description="Low-dose CT and MRI denoising/reconstruction methods in JAX/Flax",
    packages=find_packages(include=["ldct_jax", "ldct_jax.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5", "chex==0.1.92"],
        # Real CT slices for examples (pydicom-data) and the optional BM3D baseline.
        "extras": ["pydicom-data==1.0.0", "bm3d>=4.0"],
        # PyTorch is only a benchmark reference, never a library dependency.
        "bench": ["torch==2.13.0"],
    },
)
