"""dlo: Dynamic Layer Operation for Llama-family models.

Expand depth, route tokens per layer, train routers with the model, skip compute for real.
"""

from dlo.cache import RoutedCache
from dlo.calibration import calibrate
from dlo.config import RoutingConfig
from dlo.expansion import ExpansionPlan, expand_model
from dlo.export import export_static
from dlo.losses import router_loss
from dlo.modeling import (
    RoutedCausalLMOutput,
    attach_routers,
    forced_routing,
    load_model,
    routed_layers,
    routing_state,
    set_capacity,
)
from dlo.trainer import DloTrainer, RoutingLogCallback, add_routing_callback

__version__ = "0.1.0"

__all__ = [
    "ExpansionPlan",
    "expand_model",
    "export_static",
    "RoutedCache",
    "RoutedCausalLMOutput",
    "RoutingConfig",
    "DloTrainer",
    "RoutingLogCallback",
    "add_routing_callback",
    "attach_routers",
    "calibrate",
    "forced_routing",
    "load_model",
    "routed_layers",
    "router_loss",
    "routing_state",
    "set_capacity",
]
