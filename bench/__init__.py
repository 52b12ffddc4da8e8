"""Benchmarks: the transport floor (`noop_server`), the Locust file, `make bench` scripts."""
