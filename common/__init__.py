"""videogpa's pure core: video decoding, camera geometry, rasterisation and the consistency score.

Nothing in this package imports Ray; `services/` and `training/` wrap it.
"""
