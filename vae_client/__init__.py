"""The client of vae-serve: the Python SDK (`client`), the `vae-client` CLI and its exploration
commands, and the `vae-loadtest` load generator. It needs the generated stubs, numpy and Pillow
(and hdrhistogram for the load test: the `client` extra), never the server or training code."""
