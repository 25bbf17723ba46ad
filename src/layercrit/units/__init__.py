"""What a unit of a model is: layers (modules owning parameters), blocks of a residual stack, joint
groups, and the paper-style labels they are shown with."""

from .blocks import BlockStack, find_block_stack
from .labels import block_units, layer_labels
from .layers import Layer, Unit, is_norm_layer, list_layers, select_units

__all__ = ["BlockStack", "Layer", "Unit", "block_units", "find_block_stack", "is_norm_layer", "layer_labels",
           "list_layers", "select_units"]
