"""Datasets and splits, the feature cache and features-file format, label corruption."""
