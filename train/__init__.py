"""Training phases 1-3 (`prologue train ...`). Lands with the training issue."""
