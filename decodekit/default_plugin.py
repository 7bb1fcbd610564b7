"""The core's own components, registered through the same hook as any plugin."""

from decodekit.components import CORE_COMPONENTS
from decodekit.hookspecs import hookimpl


@hookimpl
def decodekit_register_components(register):
    for cls in CORE_COMPONENTS:
        register(cls)
