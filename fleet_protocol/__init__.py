"""What every edgefleet component agrees on: topics, payloads, ids, and how ONNX models are opened."""

__version__ = "0.1.0"
