"""The old name of bench.servers, for the tests that still import it from here (one launcher:
bench.servers.ServerProcess)."""

from bench.servers import MALLOC_ENV, Samples, ServerProcess, scrape, total

__all__ = ["MALLOC_ENV", "Samples", "ServerProcess", "scrape", "total"]
