"""Which channels go: per-group counts, targets allocated over groups, sensitivity, saved plans."""
