"""Loaders for public data sets in their official layouts (decoded once, cached)."""
