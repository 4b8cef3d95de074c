"""jadam: the Adam family as pure, optax-compatible gradient transformations.

Everything public is re-exported here; the modules behind it are private layers,
each importing only the ones below it:

- `_numerics`: tree helpers, bias corrections, dtype rules, hyperparameter checks;
- `_storage`: how a moment is stored (float dtypes, 8-bit codes, stochastic rounding);
- `_native`: optional CPU kernels behind one dispatch module (`jadam.native_status`);
- `_transforms`: the `scale_by_*` building blocks, one module per family, and
  `cautious`;
- `_aliases`, `_flat`, `_packed`, `_groups`, `_ema`: the optimizers users call, the
  flat layout, the in-place fused step, parameter groups, weight averaging;
- `_sharding`: meshes, state shardings, ZeRO-1, `jax.distributed` helpers;
- `jadam.train` and `jadam.cli`: the trainer and the `jadam` command, which use the
  math only through these names.

`import jadam` loads jax, optax and numpy only: the trainer's names (`Trainer`, `MLP`,
`datasets`, ...) import Flax, orbax and the rest on first use.
"""

import importlib as _importlib

from jadam._aliases import adam as adam
from jadam._aliases import adamax as adamax
from jadam._aliases import adamaxw as adamaxw
from jadam._aliases import adamw as adamw
from jadam._aliases import amsgrad as amsgrad
from jadam._aliases import amsgradw as amsgradw
from jadam._aliases import nadam as nadam
from jadam._aliases import nadamw as nadamw
from jadam._aliases import radam as radam
from jadam._aliases import radamw as radamw
from jadam._ema import EmaParamsState as EmaParamsState
from jadam._ema import ema_params as ema_params
from jadam._ema import ema_params_of as ema_params_of
from jadam._flat import FlatLayout as FlatLayout
from jadam._flat import FlatState as FlatState
from jadam._flat import flat as flat
from jadam._flat import flat_layout as flat_layout
from jadam._groups import decay_mask as decay_mask
from jadam._groups import param_groups as param_groups
from jadam._native.loader import native_status as native_status
from jadam._numerics import CONVENTIONS as CONVENTIONS
from jadam._packed import PackedAdam as PackedAdam
from jadam._packed import PackedAdamState as PackedAdamState
from jadam._packed import packed_adam as packed_adam
from jadam._packed import packed_native_available as packed_native_available
from jadam._sharding import batch_sharding as batch_sharding
from jadam._sharding import bytes_per_device as bytes_per_device
from jadam._sharding import data_parallel_mesh as data_parallel_mesh
from jadam._sharding import init_distributed as init_distributed
from jadam._sharding import jit_data_parallel as jit_data_parallel
from jadam._sharding import replicate as replicate
from jadam._sharding import replicated as replicated
from jadam._sharding import shard_batch as shard_batch
from jadam._sharding import shard_local_batch as shard_local_batch
from jadam._sharding import state_shardings as state_shardings
from jadam._sharding import to_host as to_host
from jadam._storage.quantized import Quantized as Quantized
from jadam._storage.quantized import QuantizedMoment as QuantizedMoment
from jadam._storage.rounding import StochasticRounding as StochasticRounding
from jadam._storage.rounding import stochastic_round as stochastic_round
from jadam._storage.rounding import stochastic_round_updates as stochastic_round_updates
from jadam._transforms.adabelief import ScaleByBeliefState as ScaleByBeliefState
from jadam._transforms.adabelief import adabelief as adabelief
from jadam._transforms.adabelief import scale_by_adabelief as scale_by_adabelief
from jadam._transforms.adam import ScaleByAdamState as ScaleByAdamState
from jadam._transforms.adam import ScaleByAmsgradState as ScaleByAmsgradState
from jadam._transforms.adam import scale_by_adam as scale_by_adam
from jadam._transforms.adamax import scale_by_adamax as scale_by_adamax
from jadam._transforms.adan import ScaleByAdanState as ScaleByAdanState
from jadam._transforms.adan import adan as adan
from jadam._transforms.adan import scale_by_adan as scale_by_adan
from jadam._transforms.ademamix import ScaleByAdemamixState as ScaleByAdemamixState
from jadam._transforms.ademamix import ademamix as ademamix
from jadam._transforms.ademamix import scale_by_ademamix as scale_by_ademamix
from jadam._transforms.adopt import ScaleByAdoptState as ScaleByAdoptState
from jadam._transforms.adopt import adopt as adopt
from jadam._transforms.adopt import scale_by_adopt as scale_by_adopt
from jadam._transforms.cautious import cautious as cautious
from jadam._transforms.lamb import ScaleByLambState as ScaleByLambState
from jadam._transforms.lamb import lamb as lamb
from jadam._transforms.lamb import scale_by_lamb as scale_by_lamb
from jadam._transforms.nadam import ScaleByNadamState as ScaleByNadamState
from jadam._transforms.nadam import scale_by_nadam as scale_by_nadam
from jadam._transforms.radam import scale_by_radam as scale_by_radam
from jadam._transforms.schedule_free import ScheduleFreeAdamWState as ScheduleFreeAdamWState
from jadam._transforms.schedule_free import schedule_free_adamw as schedule_free_adamw
from jadam._transforms.schedule_free import (
    schedule_free_eval_params as schedule_free_eval_params,
)
from jadam._transforms.yogi import ScaleByYogiState as ScaleByYogiState
from jadam._transforms.yogi import scale_by_yogi as scale_by_yogi
from jadam._transforms.yogi import yogi as yogi

# The trainer's names, imported on first use (PEP 562) so that an optax user who
# wants `jadam.adam` does not pay for Flax, orbax, scikit-learn or matplotlib.
_LAZY = {
    "CSVLogger": "jadam.train.callbacks",
    "Callback": "jadam.train.callbacks",
    "CheckpointError": "jadam.train.checkpoint",
    "Combine": "jadam.train.models",
    "EarlyStopping": "jadam.train.callbacks",
    "ExportedModel": "jadam.train.export",
    "History": "jadam.train.history",
    "LearningRateScheduler": "jadam.train.callbacks",
    "MLP": "jadam.train.models",
    "ModelCheckpoint": "jadam.train.callbacks",
    "ReduceLROnPlateau": "jadam.train.callbacks",
    "Schedule": "jadam.train.schedules",
    "TensorBoard": "jadam.train.callbacks",
    "TerminateOnNaN": "jadam.train.callbacks",
    "Trainer": "jadam.train.trainer",
    "datasets": "jadam.train",
    "load_exported": "jadam.train.export",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'jadam' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"
