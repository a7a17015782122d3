"""`edm2 probe`: thin layer over edm2.analysis.probe (linear-probe accuracy of a denoiser's features)."""
from __future__ import annotations

from pathlib import Path

from ..analysis.probe import check_probe_options, default_layer, list_layers, probe_sweep, write_probe_csv
from ..data import builtin_dataset_path
from ..io.loading import load_network
from ..utils.distributed import configure_threads, resolve_device
from ..utils.errors import EDM2Error, ExistingFileError
from ..utils.units import parse_float_list

HELP = "linear-probe accuracy of an unconditional denoiser's block features at a noise level"


def register(sub) -> None:
    p = sub.add_parser("probe", help=HELP, description=HELP + ". Noisy images go through the network once; a "
                       "linear classifier is fitted on the spatially averaged output of a U-Net block. "
                       "Documentation: docs/dynamics.md (Linear probe).")
    p.add_argument("--net", required=True, metavar="SNAPSHOT", help="snapshot file or run folder (unconditional)")
    p.add_argument("--data", metavar="DATASET", help="labelled dataset (folder or zip) to fit the classifier on "
                   "(default: the built-in Fashion-MNIST, the data `edm2 train` uses without --data)")
    p.add_argument("--test-data", metavar="DATASET", help="labelled dataset to measure accuracy on "
                   "(default: hold out --holdout of --data)")
    p.add_argument("--holdout", type=float, default=0.2, metavar="F", help="fraction of --data held out when there "
                   "is no --test-data (default 0.2)")
    p.add_argument("--sigma", dest="sigmas", metavar="S[,S...]",
                   help="noise level(s), e.g. 0.06 (several with --sweep)")
    p.add_argument("--layer", dest="layers", metavar="NAME[,NAME...]", help="block(s) to probe, e.g. dec.8x8_block1 "
                   "(default: the middle decoder block; 'all': every decoder block); see --list-layers")
    p.add_argument("--list-layers", action="store_true", help="print the block names of --net and exit")
    p.add_argument("--sweep", action="store_true", help="every --sigma x every --layer (default: all decoder "
                   "blocks), one CSV row each (--csv)")
    p.add_argument("--csv", metavar="FILE", help="write the results as CSV (needed with --sweep; never overwritten "
                   "unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace --csv if it exists")
    p.add_argument("--max-images", type=int, metavar="N", help="use at most N images of each dataset (seeded subset)")
    p.add_argument("--batch", dest="batch_size", type=int, default=128,
                   help="images per network call (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="noise and split seed (default 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when present)")
    p.set_defaults(func=_run)


def _run(args) -> None:
    configure_threads()
    device = str(resolve_device(args.device))
    if not args.list_layers:  # settings and the output checked before the network is read and anything runs
        if args.sigmas is None:
            raise EDM2Error("`sigmas` is required (or --list-layers)")
        check_probe_options(parse_float_list(args.sigmas, "sigmas"), batch_size=args.batch_size,
                            max_images=args.max_images, seed=args.seed,
                            holdout=args.holdout if args.test_data is None else None)
        if args.csv is not None and Path(args.csv).exists() and not args.overwrite:
            raise ExistingFileError(f"csv={args.csv}: already exists; choose another file or pass overwrite=True")
    net, meta = load_network(args.net, device=device)
    if args.list_layers:
        default = default_layer(net)
        for name in list_layers(net):
            print(name + ("   (default)" if name == default else ""))
        return
    data = builtin_dataset_path(progress=True) if args.data is None else args.data
    sigmas = parse_float_list(args.sigmas, "sigmas")
    layers = None if args.layers is None else [s.strip() for s in args.layers.split(",")]
    if args.sweep:
        if args.csv is None:
            raise EDM2Error("--sweep writes a CSV: give --csv FILE")
        layers = layers or ["all"]
    elif len(sigmas) > 1 or (layers is not None and len(layers) > 1) or layers == ["all"]:
        raise EDM2Error("several --sigma or --layer values need --sweep (and --csv FILE)")
    results = probe_sweep(net, data, sigmas, layers, test_data=args.test_data, holdout=args.holdout,
                          max_images=args.max_images, seed=args.seed, batch_size=args.batch_size, device=device,
                          meta=meta, progress=True)
    if args.csv is not None:
        write_probe_csv(results, args.csv, overwrite=args.overwrite)
    for r in results:
        print(f"sigma {r.sigma:<8g} {r.layer:<20} accuracy {r.accuracy:.4f} (train {r.train_accuracy:.4f}; "
              f"{r.n_train} train / {r.n_test} test images, {r.num_classes} classes, {r.channels} features)")
    if args.csv is not None:
        print(f"wrote {args.csv}")
