"""sermtl: attention-augmented multi-task speech emotion recognition, as an MLOps pipeline."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sermtl")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
