# make demo: install what is missing, start the local stack, upload samples, run sample queries (BACKEND=milvus: the
# index on a Milvus server the stack starts; BACKEND=faiss, the default, in the index service).
# make test: the same set-up, then the whole test suite.   make bench: throughput benchmark.
# make quality: retrieval quality on real photos and their edited copies (QUALITY_ARGS=--in-process: variants).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q -c constraints.txt
STAMP := $(VENV)/.installed
APT_PACKAGES := redis-server radosgw ceph-mon ceph-osd ceph-common chromium chromium-driver wordnet-base wrk

.PHONY: install system-deps demo test test-quick bench quality lint up down clean

install: system-deps $(STAMP)

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing from apt:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e '.[dev]'
	touch $(STAMP)

demo: install
	$(VENV)/bin/bucketlens demo $(if $(BACKEND),--backend $(BACKEND))

up: install
	$(VENV)/bin/bucketlens up $(if $(BACKEND),--backend $(BACKEND))

down:
	$(VENV)/bin/bucketlens down

test: install
	$(PY) -m pytest tests

test-quick: install
	$(PY) -m pytest tests -m "not slow"

bench: install
	$(PY) -m bench $(BENCH_ARGS)

quality: install
	$(PY) -m bench.quality $(QUALITY_ARGS)

lint: install
	$(VENV)/bin/ruff check bucketlens ingest workers index_service infra vision bench tests
	$(VENV)/bin/mypy bucketlens ingest workers index_service infra vision --ignore-missing-imports

clean: down
	rm -rf .bucketlens
