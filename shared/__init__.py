"""Code both stages use: corpus reading, tokenization and packing, masking, shard I/O."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ar2mdm")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
