"""How a moment is stored between steps: float dtypes, blockwise 8-bit codes, rounding.

`base` resolves a user's `mu_dtype`/`nu_dtype` into a storage object; `quantized`
holds the 8-bit codes and `rounding` the stochastic rounding. The transforms use only
the names re-exported here.
"""

from jadam._storage.base import FloatStorage as FloatStorage
from jadam._storage.base import Storage as Storage
from jadam._storage.base import fold_key as fold_key
from jadam._storage.base import leaf_keys as leaf_keys
from jadam._storage.base import resolve_storage as resolve_storage
