"""SiT's stochastic interpolants (Ma et al. 2024) on DiT's backbone: the flow-matching objective and
its ODE and SDE samplers, as SiT's transport package computes them."""
from transport.path import DIFFUSION_FORMS, PATHS
from transport.transport import (
    LOSS_WEIGHTS,
    PREDICTIONS,
    Transport,
    bits_per_dim,
    create_transport,
    ode_likelihood,
    sample_ode,
    sample_sde,
)

__all__ = ["DIFFUSION_FORMS", "LOSS_WEIGHTS", "PATHS", "PREDICTIONS", "Transport", "bits_per_dim",
           "create_transport", "ode_likelihood", "sample_ode", "sample_sde"]
