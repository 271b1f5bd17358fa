.PHONY: run test bench lint
run:
	python3 -m venv .venv && .venv/bin/pip install -q -e . && .venv/bin/rota up
test:
	bash ops/test
bench:
	bash ops/bench
lint:
	.venv/bin/ruff check .
