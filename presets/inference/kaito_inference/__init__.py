"""KAITO in-pod inference runtime: a FastAPI server over a transformers causal LM.

The package is copied next to ``inference_api.py`` (``/workspace/tfs/`` in the model image); it never
imports the operator's packages and the operator never imports it.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
