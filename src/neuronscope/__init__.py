"""neuronscope: look inside Llama-family language models one neuron at a time, and steer them.

The public surface of the foundation is importable from here; each capability lives in its own sub-package
(`neuronscope.atlas`, `neuronscope.stats`, `neuronscope.describe`, `neuronscope.irm`, `neuronscope.server`).
"""
from .errors import NeuronscopeError
from .interventions import (Ablate, AddToResidual, Capture, Clamp, Intervention, ResidualFunction, Scale, capture,
                            intervene)
from .subject import Subject

__version__ = "0.1.0"

__all__ = ["Subject", "NeuronscopeError", "intervene", "capture", "Intervention", "Capture", "Clamp", "Scale",
           "Ablate", "AddToResidual", "ResidualFunction", "__version__"]
