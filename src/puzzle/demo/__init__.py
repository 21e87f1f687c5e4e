"""The embedded demo: a tiny parent trained on text every Python installation carries, then the pipeline."""
