"""Model registry and built-in architectures."""

from . import fcn, mixer, resnet, vgg, vit  # noqa: F401  (importing registers the built-in models)
from .registry import MODELS, ModelFactory, create_model, factory_for_data, list_models, register_model, resolve_factory

__all__ = ["MODELS", "ModelFactory", "create_model", "factory_for_data", "list_models", "register_model", "resolve_factory"]
