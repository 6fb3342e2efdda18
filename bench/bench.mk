# Benchmark targets. Use them with `make -f bench/bench.mk bench`, or add
# `-include bench/bench.mk` to the Makefile to get `make bench`.
PYTHON_BIN ?= .venv/bin/python
BENCH_ARGS ?=

.PHONY: bench bench-pressure bench-ab bench-profile bench-micro bench-hotpath bench-worker bench-ha bench-ha-quick

bench:  ## Balancer vs HAProxy vs nginx vs direct on the same 3 replicas (wrk); writes bench/results.md
	bash bench/run.sh $(BENCH_ARGS)

BASE ?= HEAD~1
bench-pressure:  ## Saturation, a hung replica, 2x/4x overload: this checkout, commit BASE, HAProxy
	$(PYTHON_BIN) bench/pressure.py --base $(BASE) $(BENCH_ARGS)

bench-ab:  ## This checkout's async worker beside commit BASE's (default HEAD~1), HAProxy as yardstick
	bash bench/run.sh --baseline $(BASE) --targets async,haproxy --quick --rounds 4 $(BENCH_ARGS)

bench-profile:  ## The same, plus py-spy on the balancer's workers under saturation
	bash bench/run.sh --profile $(BENCH_ARGS)

bench-micro:  ## Only the micro-benchmark: hash lookup + registry check per request
	$(PYTHON_BIN) bench/micro.py

bench-hotpath:  ## The async worker's Python per routed GET, in-process: warm and on cold caches
	$(PYTHON_BIN) bench/hotpath.py

bench-worker:  ## The threads worker (lb/threads/worker.py) vs plain gthread, side by side (wrk)
	bash bench/worker_ab.sh

bench-ha:  ## The HA stack (etcd): store throughput, convergence, takeover, faults; bench/results-ha.md
	@command -v etcd >/dev/null || { echo "etcd is not installed: apt-get install etcd-server"; exit 1; }
	@command -v wrk >/dev/null || { echo "wrk is not installed: bash bench/run.sh installs it"; exit 1; }
	$(PYTHON_BIN) bench/ha.py $(BENCH_ARGS)

bench-ha-quick:  ## The same in under ~3 minutes (fewer, shorter runs); prints, writes nothing
	$(MAKE) -f bench/bench.mk bench-ha BENCH_ARGS="--quick --out= --json= $(BENCH_ARGS)"
