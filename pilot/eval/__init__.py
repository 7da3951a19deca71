"""The accuracy matrix and every metric derived from it."""
