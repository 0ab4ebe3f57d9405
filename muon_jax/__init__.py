"""muon-jax: the Muon optimizer of Moonlight (arXiv 2502.16982) as composable optax transforms."""
from muon_jax.distributed import NS_MODES
from muon_jax.muon import LABELS, default_labels, muon
from muon_jax.routing import Routing, infer_routing, is_axes_pair
from muon_jax.newton_schulz import (GRAM_MIN_ASPECT, GRAM_RESTART_EVERY, GRAM_RESTART_EVERY_CUSTOM,
                                    MOONLIGHT_COEFFS, NS_METHODS, NS_SCHEDULES, POLAR_EXPRESS_COEFFS,
                                    newton_schulz, symmetric_matmul)
from muon_jax.transforms import (LR_SCALES, ScaleByMomentumState, orthogonalize, scale_by_momentum,
                                 scale_by_shape)

# The public API (what README and docs/ document); constants such as NS_MODES, NS_METHODS, LABELS, LR_SCALES,
# MOONLIGHT_COEFFS or the Gram restart periods stay importable as attributes.
__all__ = [
    "GRAM_MIN_ASPECT", "NS_SCHEDULES", "Routing", "ScaleByMomentumState", "default_labels", "infer_routing",
    "is_axes_pair", "muon", "newton_schulz", "orthogonalize", "scale_by_momentum", "scale_by_shape",
    "symmetric_matmul",
]
__version__ = "0.1.0"
