"""Post-hoc EMA in a Hugging Face Accelerate training loop (docs/integrations.md).

Only the main process tracks the EMA, on the unwrapped model, with the global
count of training images (all processes' batches). Run it as it is (one
process) or with `accelerate launch examples/posthoc_ema_accelerate.py`.

    python examples/posthoc_ema_accelerate.py
"""
import tempfile

import torch
from accelerate import Accelerator

from edm2.ema import PowerFunctionEMA, reconstruct_state_dict


def main(steps: int = 200, batch: int = 32) -> float:
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.SiLU(), torch.nn.Linear(64, 1))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    net, opt = accelerator.prepare(net, opt)
    world = accelerator.num_processes
    ema = check = outdir = None
    if accelerator.is_main_process:
        outdir = tempfile.mkdtemp(prefix="posthoc-ema-")
        model = accelerator.unwrap_model(net)
        ema = PowerFunctionEMA(model, sigma_rels=(0.05, 0.10), outdir=outdir, snapshot_every=20 * batch * world)
        check = PowerFunctionEMA(model, sigma_rels=(0.07,))  # for comparison only
    target = torch.randn(8, 1, device=accelerator.device)
    for step in range(1, steps + 1):
        x = torch.randn(batch, 8, device=accelerator.device)
        loss = (net(x) - (x @ target).sin()).square().mean()
        opt.zero_grad()
        accelerator.backward(loss)
        opt.step()
        if accelerator.is_main_process:
            nimg = step * batch * world  # global image count
            ema.update(accelerator.unwrap_model(net), nimg)
            check.update(accelerator.unwrap_model(net), nimg)

    diff = float("nan")
    if accelerator.is_main_process:
        state = reconstruct_state_dict(outdir, 0.07)
        want = check.nets[0.07].state_dict()
        diff = max((state[k] - want[k].to(state[k].device)).abs().max() / want[k].abs().max() for k in want).item()
        print(f"snapshots: {outdir}")
        print(f"post-hoc sigma_rel 0.07 vs tracked: max relative difference {diff:.2e}")
    accelerator.wait_for_everyone()
    return diff


if __name__ == "__main__":
    main()
