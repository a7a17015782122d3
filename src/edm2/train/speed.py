"""Speed options of the training step: channels_last
memory format and torch.compile of the loss with its backward. Both are
device-agnostic and leave the arithmetic as it is (see BENCHMARKS.md,
"Training step against the authors' network", for when they help)."""
from __future__ import annotations

import torch

from ..nn.layers import force_normalize_


def to_channels_last(net: torch.nn.Module) -> torch.nn.Module:
    """Put the 4-D weights (convolutions) of `net` in channels_last memory format, in place; returns `net`.

    Values, parameter identities and state-dict layout are unchanged (a state
    dict saved from it holds the same numbers; safetensors stores them
    contiguous)."""
    return net.to(memory_format=torch.channels_last)


def compile_loss(loss_fn, **compile_kwargs):
    """`loss_fn` (edm2.loss.EDM2Loss or EDMLoss) with its deterministic part
    compiled by torch.compile: the network, the loss formula and, through
    AOTAutograd, their backward as one graph. The noise is still drawn eagerly
    from the same generators, so the draws (and resume) are unchanged; the
    compiled arithmetic may round differently from eager mode. MPConv's forced
    weight normalisation, which a graph cannot hold, runs eagerly before each
    call (`edm2.nn.force_normalize_`)."""
    core = torch.compile(loss_fn.evaluate, **compile_kwargs)

    def compiled(net, images, labels=None, generator=None):
        if net.training:
            force_normalize_(net)
        return core(net, labels, *loss_fn.draw(images, generator))

    return compiled
