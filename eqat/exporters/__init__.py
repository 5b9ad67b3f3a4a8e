"""Exporters: one small module per format, registered by name in `EXPORTERS`.

    gptq    eqat/exporters/gptq.py
    awq     eqat/exporters/awq.py
    compressed-tensors eqat/exporters/compressed.py
    onnx    eqat/exporters/onnx.py
    bitblas eqat/exporters/bitblas.py

`export_checkpoint(src, fmt, out, **options)` writes a complete Hugging Face folder; the
formats are spelled out in each module and in docs/formats.md.
"""

from eqat.exporters import awq, bitblas, compressed, gptq, onnx  # noqa: F401  (register themselves)
from eqat.exporters.base import EXPORTERS, Exporter, QuantizedLayer, export_checkpoint, register

__all__ = ["EXPORTERS", "Exporter", "QuantizedLayer", "export_checkpoint", "register"]
