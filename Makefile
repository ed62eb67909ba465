# The two commands a newcomer needs: `make run` and `make test`. Everything else they need
# (a virtualenv, pinned dependencies, generated stubs) is built on demand.
PYTHON ?= python3
UV_VERSION := 0.13.8
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
PY := $(VENV)/bin/python
PROTOS := $(wildcard protos/scanjobs/v1/*.proto)
ARGS ?=

.PHONY: setup proto web run demo bytecode test test-busy lint buf fmt bench clean

setup: $(VENV)/.synced

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet uv==$(UV_VERSION)

# With bytecode compiled at install: every Python process (the server's workers, the CLI, the
# many processes of the test suite) would otherwise compile grpc, protobuf, psycopg and the rest
# again at each start wherever PYTHONDONTWRITEBYTECODE is set.
$(VENV)/.synced: $(UV) pyproject.toml uv.lock Makefile
	$(UV) sync --locked --quiet --compile-bytecode
	touch $@

proto: setup
	rm -rf gen/scanjobs && $(PY) protos/generate.py gen

# The page served at / on the HTTP port: TypeScript in web/, bundled into server/static
# (committed, so that `make run` needs no Node.js). Rebuild it after changing web/ or protos/.
web:
	cd web && npm ci --no-audit --no-fund && npm run build

HTTP_LISTEN ?= $(or $(SCANJOBS_HTTP_LISTEN),127.0.0.1:8080)

run: setup
	@echo "scan page: http://$(HTTP_LISTEN)/   (gRPC on $${SCANJOBS_LISTEN:-127.0.0.1:50051})"
	$(PY) -m scanjobs.server --root "$${SCANJOBS_ROOT:-$$HOME}" --data-dir "$${SCANJOBS_DATA_DIR:-.data}" --http-listen "$(HTTP_LISTEN)" $(ARGS)

demo: setup
	$(PY) -m bench.demo

# The suite runs in TEST_WORKERS processes (pytest-xdist), a test module at a time each: a
# module's tests share its fixtures (a built wheel, npm packages) and never race each other.
# Coverage combines every worker's data and that of the processes they start.
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadscope

# The project's own bytecode, written once before a run for the same reason (not recursive
# where a folder holds other things: bench/.cache, tests/interop).
bytecode: setup
	$(PY) -m compileall -q -l server client tests bench
	$(PY) -m compileall -q gen

test: bytecode
	$(PY) -m pytest $(XDIST) --cov --cov-report=term $(ARGS)

# The suite on a busy machine: two busy-loop neighbours keep both cores busy while it runs.
# They are started and stopped here, also when the suite fails or is interrupted.
BUSY_LOOP := while True: sum(i*i for i in range(10000))
test-busy: bytecode
	@$(PYTHON) -c "$(BUSY_LOOP)" & one=$$!; \
	$(PYTHON) -c "$(BUSY_LOOP)" & two=$$!; \
	trap 'kill $$one $$two 2>/dev/null; wait $$one $$two 2>/dev/null' EXIT INT TERM; \
	echo "busy neighbours: pids $$one $$two"; \
	$(PY) -m pytest $(XDIST) $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# buf lint and buf format on protos/ (the buf binary comes from npm as @bufbuild/buf).
BUF_VERSION := 1.75.0
buf:
	npx --yes @bufbuild/buf@$(BUF_VERSION) lint
	npx --yes @bufbuild/buf@$(BUF_VERSION) format --diff --exit-code

fmt: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: setup
	$(PY) -m bench $(ARGS)

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache .mypy_cache .ruff_cache .coverage
