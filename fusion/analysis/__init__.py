"""fusion.analysis subpackage (public names are re-exported from fusion/__init__.py)."""
