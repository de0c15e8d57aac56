"""Placeholder: filled in by the quantization work of issue 4."""
