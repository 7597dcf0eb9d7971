"""Models-from-code entry point of the registered pyfunc (``mlflow.pyfunc.log_model(python_model=<this file>)``).

MLflow copies this file into the model folder and executes it at load time; it builds the model from
the installed ``facedetail`` package, so loading a registered model unpickles nothing.
"""
import mlflow

from facedetail.serving import FaceDetailPyfunc

mlflow.models.set_model(FaceDetailPyfunc())
