"""The pruning algorithms: masks, scorers, layer-wise allocation, TRIM and the per-block step.

Plain tensor code that reads like the papers. Every algorithm receives an `Executor` (eager by
default) and never imports `trimprune.exec`, where streams, graphs, kernels and host copies live.
"""
