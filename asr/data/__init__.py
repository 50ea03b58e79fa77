"""Datasets, features/labels, collation and the synthetic speech corpus."""
