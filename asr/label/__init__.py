"""Pseudo-labelling: the teacher labels a dataset before any training, and stores the targets KD reads."""
