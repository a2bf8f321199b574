"""Graph contracts, ONNX lowering, TensorRT builds and the bundle. Lands with the export issue."""
