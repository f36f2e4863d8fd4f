"""Calibration: data sources and sampling protocols, the capture of block inputs and the
layer-sequential walk over the hidden-state streams, and the statistics hooks."""
