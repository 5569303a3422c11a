"""Benchmarks of the Overlay datapaths and control plane (``make bench``; docs/benchmarks.md)."""
