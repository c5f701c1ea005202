"""Test-wide settings: CPU JAX, quiet logs, one compilation cache for every test run."""
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("LDCT_JAX_COMPILATION_CACHE",
                      os.path.join(tempfile.gettempdir(), "ldct_jax_test_xla_cache"))
