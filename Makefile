# Shortcuts for the scripts in scripts/ (each sets up .venv on first use).
.PHONY: demo test reproduce-small bench

demo:
	bash scripts/demo.sh

test:
	bash scripts/test.sh

# the paper's 2d / prologue / post comparison on Fashion-MNIST (about an hour on a 2-core CPU)
reproduce-small:
	bash scripts/experiment.sh

bench:
	.venv/bin/python bench/runtime_bench.py
	.venv/bin/python bench/quantize_bench.py
