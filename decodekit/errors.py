"""Errors that name the culprit and the fix."""


class DecodekitError(Exception):
    """Bad input or configuration, raised before any compute.

    Not a ValueError on purpose: pydantic would wrap a ValueError raised while resolving a
    strategy into a ValidationError and bury the message."""


class PluginError(RuntimeError):
    """A plugin could not be loaded or broke the hook contract."""
