"""Post-hoc EMA for any PyTorch model (docs/integrations.md).

Trains a small MLP on synthetic data, tracks two power-function EMAs
(sigma_rel 0.05 and 0.10) with snapshots, then reconstructs a third EMA length
(0.07) after training and compares it with an EMA of that length tracked
directly during the same run.

    python examples/posthoc_ema_plain.py
"""
import tempfile

import torch

from edm2.ema import PowerFunctionEMA, reconstruct_state_dict


def main(steps: int = 200, batch: int = 32) -> float:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.SiLU(), torch.nn.Linear(64, 1))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    outdir = tempfile.mkdtemp(prefix="posthoc-ema-")  # the snapshots (safetensors + JSON)
    ema = PowerFunctionEMA(net, sigma_rels=(0.05, 0.10), outdir=outdir, snapshot_every=20 * batch)
    check = PowerFunctionEMA(net, sigma_rels=(0.07,))  # for comparison only; post-hoc EMA does not need it
    target = torch.randn(8, 1)
    for step in range(1, steps + 1):
        x = torch.randn(batch, 8)
        loss = (net(x) - (x @ target).sin()).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(net, step * batch)  # the count of training images seen so far
        check.update(net, step * batch)

    state = reconstruct_state_dict(outdir, 0.07)  # a state dict of net, EMA length sigma_rel = 0.07
    want = check.nets[0.07].state_dict()
    diff = max((state[k] - want[k]).abs().max() / want[k].abs().max() for k in want).item()
    print(f"snapshots: {outdir}")
    print(f"post-hoc sigma_rel 0.07 vs tracked: max relative difference {diff:.2e}")
    return diff


if __name__ == "__main__":
    main()
