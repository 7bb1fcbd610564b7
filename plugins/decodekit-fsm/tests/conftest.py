import pytest

import decodekit


@pytest.fixture(autouse=True, scope="session")
def _fresh_plugins():
    # The plugin may have been installed after another test imported decodekit.
    decodekit.reset_plugin_manager()
    yield
