"""Command-line tools run once by a user, outside training (``python -m ldct_jax.tools.<name>``)."""
