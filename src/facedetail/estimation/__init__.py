"""facedetail.estimation (plain module, knows nothing of Kedro): per-face estimation.

* :mod:`facedetail.estimation.estimator`: :class:`FaceEstimator` (68 landmarks, mask, FaceNet, 3DMM coefficients).
* :mod:`facedetail.estimation.fitting`: the 3DMM fit (analysis by synthesis; renders through :mod:`facedetail.render`).
* :mod:`facedetail.estimation.cache`: the per-face content cache.
"""
