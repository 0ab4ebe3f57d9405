"""muon-jax: the Muon optimizer of Moonlight (arXiv 2502.16982) as composable optax transforms."""
from muon_jax.distributed import NS_MODES
from muon_jax.muon import LABELS, default_labels, muon
from muon_jax.newton_schulz import MOONLIGHT_COEFFS, NS_COEFFS, POLAR_EXPRESS_COEFFS, newton_schulz
from muon_jax.transforms import (LR_SCALES, ScaleByMomentumState, orthogonalize, scale_by_momentum,
                                 scale_by_shape)

__all__ = [
    "LABELS", "LR_SCALES", "MOONLIGHT_COEFFS", "NS_COEFFS", "NS_MODES", "POLAR_EXPRESS_COEFFS",
    "ScaleByMomentumState", "default_labels", "muon", "newton_schulz", "orthogonalize",
    "scale_by_momentum", "scale_by_shape",
]
__version__ = "0.1.0"
