"""Layer 7, experiments: sweeps, result tables and figures, the GC benchmark, encoder pretraining. Uses: every layer
below."""
