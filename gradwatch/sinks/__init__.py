"""Sinks: where records go (run log, Prometheus, logging)."""

from gradwatch.sinks.base import Sink
from gradwatch.sinks.jsonl import JsonlSink

__all__ = ["JsonlSink", "Sink"]
