"""Inference: what a trained model needs beside its weights, how inputs are read, how scores are
computed (PyTorch or ONNX Runtime) and written, and the export formats.

The composition roots are q2l.predict (`q2l-predict`), q2l.export (`q2l-export`) and
q2l.attention (`q2l-attention`); docs/inference.md shows the commands.
"""
