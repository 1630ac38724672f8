"""The edgefleet model registry: versioned, signed ONNX models on MLflow."""
