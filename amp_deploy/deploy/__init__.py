"""Deployment: ONNX export, TensorRT engines, runners for each runtime, Triton model repository entries."""
