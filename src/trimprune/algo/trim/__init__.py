"""TRIM (Beck, Rudman & Eickhoff 2025): the row-wise sparsity search (`search`), its exact integer
allocation (`counts`), the quality metrics (`metrics`) and their evaluators (`evaluators`), and the
safeguards against the scorer alone (`safeguard`)."""
