"""gpuctl: operate a scale-to-zero GPU job system on AWS from the command line."""

__version__ = "0.1.0"
__all__ = ["__version__"]
