"""The error a user can cause and fix. Kept free of other alexnet_jax imports so every module (the data
package included) can raise it without pulling in the model; the config checks live in `alexnet_jax.config`."""


class UserError(Exception):
    """Something the user can fix (a config value, a missing file); `main` prints it as one line."""
