"""The served model: opening ONNX Runtime sessions on a provider (sessions), loading and
verifying a version (runtime), its batchers (served), and the live version with its leases and
hot reloads (holder)."""
