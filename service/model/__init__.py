"""The served model: loading and verifying a version (runtime), its batchers (served), and the
live version with its leases and hot reloads (holder)."""
