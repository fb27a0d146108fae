"""videogpa's pure core: video decoding, camera geometry, rasterisation and the consistency score.

Nothing in this package imports Ray; `services/` and `training/` wrap it.
"""

import os

# OpenCV reads its decoder pixel limit once, when it is loaded: a second line of defence behind
# the header checks of common.video (16384 x 16384; OpenCV's own default is 2**30 pixels).
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(2**28))

# OpenCV and pycolmap both bundle libpng; loading pycolmap first makes cv2.imwrite(".png") crash
# the process. Importing cv2 here, before anything can import pycolmap, fixes the order.
import cv2  # noqa: E402, F401
