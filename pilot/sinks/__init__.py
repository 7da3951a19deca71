"""Where per-session results go: CSV files (always) and Weights & Biases (optional)."""
