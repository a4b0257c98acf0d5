"""Layer 1, the math: scores, heatmaps and applying a trust calibration, as pure
functions over numpy arrays. Imports nothing of the package but :mod:`gradtrust.errors`."""
