"""The package version, in a module of its own so that setup.cfg and run.json read it without importing torch."""
__version__ = "0.1.0"
