"""Sinks: where records go (run log, Prometheus, logging)."""

from gradwatch.sinks.base import LiveSink, Sink
from gradwatch.sinks.jsonl import JsonlSink
from gradwatch.sinks.logs import LoggingSink
from gradwatch.sinks.prometheus import PrometheusSink

__all__ = ["JsonlSink", "LiveSink", "LoggingSink", "PrometheusSink", "Sink"]
