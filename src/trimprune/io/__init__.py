"""Models in and out: loading and the model adapter, evaluation, export and reports."""
