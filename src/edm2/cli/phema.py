"""`edm2 phema`: a thin layer over `edm2.ema.posthoc.reconstruct` (post-hoc EMA, paper Sec. 3.2, App. C.5)."""
from __future__ import annotations

from ..ema.posthoc import MAX_PROFILE_ERROR, reconstruct
from ..io.snapshot import read_snapshot_meta
from ..utils.units import parse_float_list, parse_nimg

HELP = "post-hoc EMA: snapshots of any EMA length (sigma_rel) from a finished run's snapshots"


def register(sub) -> None:
    p = sub.add_parser("phema", help=HELP, description=HELP + ". Outputs are ordinary snapshots named "
                       "snapshot-<nimg>-<sigma_rel>.safetensors, usable by `edm2 generate --net`.")
    p.add_argument("--rundir", required=True, metavar="DIR", help="training run folder with its EMA snapshots")
    p.add_argument("--outdir", required=True, metavar="DIR", help="folder for the reconstructed snapshots")
    p.add_argument("--std", dest="sigma_rels", required=True, metavar="LIST",
                   help="EMA lengths sigma_rel in (0, 0.2887): 0.05,0.1 or a range 0.010,0.015,...,0.250")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--at-nimg", metavar="N",
                      help="training time in images, e.g. 8388608 or 8Mi (default: last snapshot)")
    when.add_argument("--at-kimg", metavar="K", type=int, help="training time in the reference's kimg naming")
    p.add_argument("--plot", action="store_true", help="also write phema-<nimg>-<sigma_rel>.png per output "
                   "(wanted against realised weighting of past training, like the paper's Figure 4)")
    p.add_argument("--max-profile-error", metavar="E", type=parse_max_profile_error, default=MAX_PROFILE_ERROR,
                   help=f"refuse if an output's realised profile differs from the wanted one by more than this "
                        f"relative L2 error (default {MAX_PROFILE_ERROR}; 'none': no check)")
    p.add_argument("--overwrite", action="store_true", help="replace output files that already exist")
    p.set_defaults(func=run)


def parse_max_profile_error(text: str):
    """--max-profile-error: a number >= 0, or 'none' (no check); checked by reconstruct."""
    if text.strip().lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        return text  # reconstruct refuses it in one line naming max_profile_error


def run(args) -> int:
    sigma_rels = parse_float_list(args.sigma_rels, "sigma_rels")
    at_nimg = None if args.at_nimg is None else parse_nimg(args.at_nimg, "at_nimg")
    paths = reconstruct(args.rundir, args.outdir, sigma_rels, at_nimg=at_nimg, at_kimg=args.at_kimg,
                        plot=args.plot, overwrite=args.overwrite, max_profile_error=args.max_profile_error)
    for path in paths:
        info = read_snapshot_meta(path)["origin"]["phema"]
        print(f"{path}  sigma_rel={info['ema_std']:.4f}  from {len(info['inputs'])} snapshots  "
              f"profile error {info['fit_error']:.1e}")
    return 0
