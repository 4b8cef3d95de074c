"""The trainer: Keras-like training of Flax models on jadam's optimizers.

Knows Flax and data, never the optimizer math (it only calls ``init``/``update``).
"""

from jadam.train import datasets as datasets
from jadam.train.callbacks import Callback as Callback
from jadam.train.callbacks import CSVLogger as CSVLogger
from jadam.train.callbacks import EarlyStopping as EarlyStopping
from jadam.train.callbacks import LearningRateScheduler as LearningRateScheduler
from jadam.train.callbacks import ModelCheckpoint as ModelCheckpoint
from jadam.train.callbacks import ReduceLROnPlateau as ReduceLROnPlateau
from jadam.train.callbacks import TensorBoard as TensorBoard
from jadam.train.callbacks import TerminateOnNaN as TerminateOnNaN
from jadam.train.checkpoint import CheckpointError as CheckpointError
from jadam.train.export import ExportedModel as ExportedModel
from jadam.train.export import load_exported as load_exported
from jadam.train.history import History as History
from jadam.train.models import MLP as MLP
from jadam.train.models import Combine as Combine
from jadam.train.schedules import Schedule as Schedule
from jadam.train.trainer import Trainer as Trainer
from jadam.train.trainer import make_optimizer as make_optimizer
