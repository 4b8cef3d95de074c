"""jadam's optional C++ kernels for the CPU: sources (`*.cc`, `kernels.h`), the loader
that builds, caches and verifies them (`loader`), and the one module that chooses them
(`dispatch`). The math modules reach them only through `dispatch`."""

from jadam._native.loader import NativeError as NativeError
from jadam._native.loader import build as build
from jadam._native.loader import errors as errors
from jadam._native.loader import loaded as loaded
from jadam._native.loader import status as status
