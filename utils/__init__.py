"""Shared helpers: losses and targets, the training loop, I/O, theory maths, reports."""
