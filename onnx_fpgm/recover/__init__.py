"""Recovering what pruning cost, from unlabeled calibration data (compensation)."""
