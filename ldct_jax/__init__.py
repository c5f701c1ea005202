"""ldct_jax: low-dose CT denoising in JAX/Flax, with a CT simulator in pure jnp.

Conventions used throughout the package:
  * images are NHWC (NDHWC for 3D), float32;
  * CT intensities are Hounsfield units (HU) in the data layer; models see
    them normalised as the config states (see ``ldct_jax.data.pipeline``);
  * every reported PSNR/SSIM names its HU window and data range.
"""

__version__ = "0.1.0"
