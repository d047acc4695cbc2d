"""Sinks: where records go (run log, Prometheus, TensorBoard, logging)."""

from gradwatch.sinks.base import LiveSink, Sink
from gradwatch.sinks.jsonl import JsonlSink
from gradwatch.sinks.logs import LoggingSink
from gradwatch.sinks.prometheus import PrometheusSink
from gradwatch.sinks.tensorboard import TensorBoardSink

__all__ = ["JsonlSink", "LiveSink", "LoggingSink", "PrometheusSink", "Sink", "TensorBoardSink"]
