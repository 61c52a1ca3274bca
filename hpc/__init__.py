"""ModelTainer's core: specs and site config, backends, the job wrapper, the registry, the CLI."""

from importlib.metadata import PackageNotFoundError, version


def _installed_version() -> str:
    # The version is the installed distribution's (setuptools-scm derives it from git tags
    # at install time); an uninstalled tree on PYTHONPATH says so instead of guessing.
    try:
        return version("modeltainer")
    except PackageNotFoundError:
        return "0+unknown"


__version__ = _installed_version()
