"""Measurement, kept outside the engine: it only consumes generate_step, caches and modules."""
