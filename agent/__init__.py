"""edge-agent: quantized YOLOv8 detection on edge devices."""

__version__ = "0.1.0"
