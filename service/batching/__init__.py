"""Dynamic batching: a bounded queue of calls (queue), when to wait for a fuller batch (hold), and
the batcher that runs them on the inference threads (batcher)."""
