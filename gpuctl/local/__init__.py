"""Local mode: stand-ins that let the whole pipeline run on one machine without AWS or a GPU."""
