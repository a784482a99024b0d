"""Small helpers every layer may use: progress bars, key grouping for reports."""
