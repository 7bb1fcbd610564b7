"""Errors that name the culprit and the fix."""


class DecodekitError(ValueError):
    """Bad input or configuration, raised before any compute."""


class PluginError(RuntimeError):
    """A plugin could not be loaded or broke the hook contract."""
