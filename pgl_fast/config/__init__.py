"""The training config: one dataclass per component (``DataConfig``, ``ModelConfig``,
``MethodConfig``, ``OptimConfig``, ``RuntimeConfig``, ``StrategyConfig``, ``RunConfig``), each
validating its own fields, and ``TrainConfig``, which composes them, checks what joins them and
generates the training CLI. ``from pgl_fast.config import ...`` names everything from here."""
from .base import _f
from .composed import (COMPONENTS, CROSS_CHECKS, GROUP_TITLES, NO_EFFECT, TrainConfig, build_parser,
                       config_from_args, config_from_dict, explicit_fields)
from .data import DATASETS, PIPELINES, RECIPES, DataConfig
from .method import INFOPRO_LAMBDAS, MAN_BASES, METHODS, PGL_LOCALS, MethodConfig
from .model import ModelConfig
from .optim import OptimConfig
from .run import RunConfig
from .runtime import DEFAULT_FACTOR, RuntimeConfig
from .strategy import StrategyConfig

__all__ = ["COMPONENTS", "CROSS_CHECKS", "DATASETS", "DEFAULT_FACTOR", "GROUP_TITLES", "INFOPRO_LAMBDAS",
           "MAN_BASES", "METHODS", "NO_EFFECT", "PGL_LOCALS", "PIPELINES", "RECIPES", "DataConfig",
           "MethodConfig", "ModelConfig", "OptimConfig", "RunConfig", "RuntimeConfig", "StrategyConfig",
           "TrainConfig", "build_parser", "config_from_args", "config_from_dict", "explicit_fields"]
