"""Dynamic batching: the batcher that admits requests (batcher), when queued rows go to a run
(gather) and whether to wait for a fuller batch (hold), the runs on the event loop or the
inference threads (runs), and the queue's rows and outputs (queue)."""
