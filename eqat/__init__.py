"""eqat: low-bit weight-only LLMs with quantization-aware training (EfficientQAT), exported to real runtimes.

Importing eqat imports neither Triton nor initialises CUDA.
"""

__version__ = "0.1.0"

from eqat.errors import EqatError, EqatInputError  # noqa: E402
from eqat.scheme import QuantScheme  # noqa: E402

__all__ = ["__version__", "QuantScheme", "EqatError", "EqatInputError"]
