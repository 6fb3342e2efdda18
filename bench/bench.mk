# Benchmark targets. Use them with `make -f bench/bench.mk bench`, or add
# `-include bench/bench.mk` to the Makefile to get `make bench`.
PYTHON_BIN ?= .venv/bin/python
BENCH_ARGS ?=

.PHONY: bench bench-profile bench-micro bench-hotpath bench-worker

bench:  ## Balancer vs HAProxy vs nginx vs direct on the same 3 replicas (wrk); writes bench/results.md
	bash bench/run.sh $(BENCH_ARGS)

bench-profile:  ## The same, plus py-spy on the balancer's workers under saturation
	bash bench/run.sh --profile $(BENCH_ARGS)

bench-micro:  ## Only the micro-benchmark: hash lookup + registry check per request
	$(PYTHON_BIN) bench/micro.py

bench-hotpath:  ## The async worker's Python per routed GET, in-process: warm and on cold caches
	$(PYTHON_BIN) bench/hotpath.py

bench-worker:  ## The threads worker (lb/worker.py) vs plain gthread, side by side (wrk)
	bash bench/worker_ab.sh
