"""TensorFlow's C++ log level, set on import, before TensorFlow is first imported.

On a machine with no NVIDIA device, TensorFlow's CUDA probe logs "failed call to
cuInit" at ERROR level on every start: noise on every CPU machine, not an error.
There, level 3 hides it; with a GPU, level 2 keeps real CUDA errors in sight. A
level the user set (``TF_CPP_MIN_LOG_LEVEL``) is kept. The few INFO lines TensorFlow
writes before its logging starts cannot be turned off this way.
"""

from __future__ import annotations

import glob
import os

__all__ = ["quiet_tensorflow"]


def quiet_tensorflow() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2" if glob.glob("/dev/nvidia[0-9]*") else "3")


quiet_tensorflow()
