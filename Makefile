# The two commands of the README. Both install what they need into .venv first.
PY := .venv/bin/python

.PHONY: demo test install
install:
	@bash scripts/install.sh

demo: install
	$(PY) -m vllm_kvflow.cli demo

test: install
	$(PY) -m vllm_kvflow.cli make-model
	$(PY) -m pytest tests -q -p no:cacheprovider
