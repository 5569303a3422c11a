"""Overlay: a pluggable overlay-network SDK with an eBPF datapath."""

__version__ = "0.1.0"
