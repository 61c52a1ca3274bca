"""ModelTainer's core: specs and site config, backends, the job wrapper, the registry, the CLI."""

__version__ = "0.1.0"
