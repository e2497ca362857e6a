"""Backbones by name, feature extraction, and the linear head's initialisation."""
