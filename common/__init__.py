"""videogpa's pure core: video decoding, camera geometry, rasterisation and the consistency score.

Nothing in this package imports Ray; `services/` and `training/` wrap it.
"""

# OpenCV and pycolmap both bundle libpng; loading pycolmap first makes cv2.imwrite(".png") crash
# the process. Importing cv2 here, before anything can import pycolmap, fixes the order.
import cv2  # noqa: F401
