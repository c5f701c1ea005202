"""Pure jnp physics: CT projection, reconstruction and dose simulation; MRI sampling."""
