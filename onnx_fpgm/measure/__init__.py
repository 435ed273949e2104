"""What a model costs and how well it does: MACs, params, latency, fidelity on calibration data."""
