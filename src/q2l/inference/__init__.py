"""Inference: what a trained model needs beside its weights, how inputs are read, how scores are
computed (PyTorch or ONNX Runtime) and written, and the export formats.

The commands (q2l.cli.predict, q2l.cli.export, q2l.cli.attention) call q2l.inference.predict,
q2l.inference.export and q2l.inference.attention; docs/inference.md shows them.
"""
