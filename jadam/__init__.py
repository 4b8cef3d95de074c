"""jadam: the Adam family as pure, optax-compatible gradient transformations.

Everything public is re-exported here; the modules behind it are private.
"""

from jadam._adam import ScaleByAdamState as ScaleByAdamState
from jadam._adam import ScaleByAmsgradState as ScaleByAmsgradState
from jadam._adam import scale_by_adam as scale_by_adam
from jadam._adamax import scale_by_adamax as scale_by_adamax
from jadam._aliases import adam as adam
from jadam._aliases import adamax as adamax
from jadam._aliases import adamaxw as adamaxw
from jadam._aliases import adamw as adamw
from jadam._aliases import amsgrad as amsgrad
from jadam._aliases import nadam as nadam
from jadam._aliases import nadamw as nadamw
from jadam._aliases import radam as radam
from jadam._nadam import ScaleByNadamState as ScaleByNadamState
from jadam._nadam import scale_by_nadam as scale_by_nadam
from jadam._numerics import CONVENTIONS as CONVENTIONS
from jadam._radam import scale_by_radam as scale_by_radam

__version__ = "0.1.0"
