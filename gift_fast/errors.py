"""Errors the loaders and the pre-flight checks share (a leaf module: it imports nothing of the package)."""


class ModelUnavailable(OSError, RuntimeError):
    """The weights are neither on this machine nor downloadable (no network, unknown id), or they failed to
    load. An OSError (what the commands report as one line) and a RuntimeError (what loaders raised before)."""
