"""Experiments and measurements on trained networks (nothing here is needed to train or sample).

- `edm2.analysis.dynamics`: training dynamics, the activation and weight
  magnitudes per U-Net level of the paper's Fig. 3 and Fig. 15 (`edm2 train
  --dynamics`, `edm2 dynamics`; docs/dynamics.md). `find_blocks` there is the
  one definition of the U-Net's encoder/decoder blocks.
- `edm2.analysis.probe`: linear-probe accuracy of a denoiser's block features
  (`edm2 probe`; docs/dynamics.md, "Linear probe").
- `edm2.analysis.ladder`: the ablation ladder of the paper's Table 1 in
  miniature, trained, evaluated and tabulated (`edm2 ladder`; docs/ladder.md).
  Its networks are those of `edm2.nn.factory.build_network`.
- `edm2.analysis.ema_analysis`: the paper's EMA analysis (Fig. 5) behind
  `edm2 sweep`: groups of tensors, the optimum within the evaluation noise, and
  the figures per group, over training time and against guidance (docs/ema-analysis.md).
- `edm2.analysis.flops`: parameters and multiply-accumulates of a network
  (`edm2 flops`).
"""
