"""Capture: which modules are recurrent, forward hooks, and replay of fused RNN kernels."""
