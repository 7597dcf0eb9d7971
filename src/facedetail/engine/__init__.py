"""facedetail.engine (plain module, knows nothing of Kedro): inference, used by the CLI, the MLflow pyfunc and the
inference pipeline.

* :mod:`~facedetail.engine.inputs`: photos as paths, bytes, arrays or loaders; image folders.
* :mod:`~facedetail.engine.checkpoint`: the detail-checkpoint format (written by training, read here).
* :mod:`~facedetail.engine.fitter`: detect + align + estimate (:class:`FaceFitter`, ``facedetail fit``).
* :mod:`~facedetail.engine.reconstructor`: generator inputs → displacement → renders (:class:`Reconstructor`).
* :mod:`~facedetail.engine.export`: per-face files (meshes, maps, JSON, strips) and CSV reports.
* :mod:`~facedetail.engine.retarget`: expression re-targeting, sweeps, ``facedetail retarget`` outputs.
"""
