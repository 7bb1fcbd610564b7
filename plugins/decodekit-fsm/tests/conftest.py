import pytest
import torch

import decodekit


@pytest.fixture(autouse=True, scope="session")
def _fresh_plugins():
    # The plugin may have been installed after another test imported decodekit.
    decodekit.reset_plugin_manager()
    yield


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request):
    # Tiny models run fastest on one thread: on the shared 2-core box two OpenMP threads made a
    # 20-token tiny generation ~70x slower (7 s vs 0.1 s) by spinning against other processes.
    # Real-model tests keep every thread; the setting is restored after each test.
    threads = torch.get_num_threads()
    if request.node.get_closest_marker("real_model") is None:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
