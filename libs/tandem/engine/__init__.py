"""tandem engine."""
