"""decodekit: a plugin-based decoding-strategy framework for causal language models."""

from decodekit.api import generate, stream
from decodekit.components import Cache, Component, Drafter, Greedy, HFProcessor, NoCache, Processor, Sampler
from decodekit.errors import DecodekitError, PluginError
from decodekit.hookspecs import hookimpl
from decodekit.loop import GenerationResult
from decodekit.models import load_model
from decodekit.plugins import get_plugin_manager, reset_plugin_manager
from decodekit.state import DecodeState, Proposal
from decodekit.strategy import Strategy

__version__ = "0.1.0"

__all__ = [
    "Cache", "Component", "DecodeState", "DecodekitError", "Drafter", "GenerationResult", "Greedy",
    "HFProcessor", "NoCache", "PluginError", "Processor", "Proposal", "Sampler", "Strategy",
    "generate", "get_plugin_manager", "hookimpl", "load_model", "reset_plugin_manager", "stream",
]
