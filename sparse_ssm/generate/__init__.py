"""The generate floor: the sampling settings (`generation` section), logit filters, and the
streaming decode loop on the recurrent cache.  Imports `model`, `data` and `util` only."""

from .loading import LoadedModel, load_checkpoint
from .settings import GenerationConfig
from .stream import Step, generate, generate_streams, generate_text, stream_generate

__all__ = ["GenerationConfig", "LoadedModel", "load_checkpoint", "Step", "generate", "generate_streams",
           "generate_text", "stream_generate"]
