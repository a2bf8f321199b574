"""Graph contracts, ONNX lowering, bundle writing and verification (`prologue export`)."""
