"""Datasets, class-incremental scenarios and the input pipeline."""
