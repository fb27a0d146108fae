"""The web page served at `/` (a package so that setuptools ships index.html)."""
