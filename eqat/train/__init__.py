"""Quantization methods. Each takes (model, scheme, options) and leaves QuantLinear modules in place."""
