"""Shared helpers of the benchmark scripts (perf.py, profile_endpoint.py).

results   timestamped results dirs, git commit, machine description, JSON/CSV writers
deploy    deploy a local stack (deploy.local.stack) on its own ports for one benchmark
aiperf    build and run `aiperf profile` the way Dynamo's perf.sh does; parse its exports
loadgen   small built-in async load generator over the OpenAI streaming API (httpx)
metrics   per-level summary rows (TTFT/ITL percentiles, throughputs) from either client
plots     matplotlib plots (headless, Agg backend)
"""
