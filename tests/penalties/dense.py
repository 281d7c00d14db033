"""Dense float64 references written without the package: functions of a flat θ."""

import torch
from torch.func import functional_call


def outputs_of_flat(module, inputs):
    """θ ↦ module(inputs), with the parameters given as one flat vector."""
    names = [n for n, _ in module.named_parameters()]
    shapes = [p.shape for p in module.parameters()]
    sizes = [p.numel() for p in module.parameters()]

    def outputs(theta):
        pieces = torch.split(theta, sizes)
        params = {
            n: t.reshape(s) for n, t, s in zip(names, pieces, shapes, strict=True)
        }
        return functional_call(module, params, (inputs,))

    return outputs


def flat_params(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def term_of_flat(term, module):
    """θ ↦ term(θ) for a PenaltyTerm of ``module``'s parameters."""
    shapes = [p.shape for p in module.parameters()]
    sizes = [p.numel() for p in module.parameters()]

    def value(theta):
        pieces = torch.split(theta, sizes)
        return term([t.reshape(s) for t, s in zip(pieces, shapes, strict=True)])

    return value
