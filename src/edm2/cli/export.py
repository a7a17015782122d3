"""`edm2 export`: a thin layer over `edm2.io.hub.export_hf` and `edm2.io.diffusers.export_diffusers`."""
from __future__ import annotations

from ..io.hub import export_hf
from ..sampling import check_guidance
from ..utils.errors import EDM2Error

HELP = "export a snapshot as a Hugging Face model folder (--format hf) or a diffusers pipeline (--format diffusers)"


def register(sub) -> None:
    p = sub.add_parser("export", help=HELP, description=HELP + ". hf: config.json + model.safetensors (+ edm2.json, "
                       "README.md), loadable with Precond.from_pretrained. diffusers: an EDM2Pipeline folder "
                       "(model_index.json, net/, gnet/, vae/), loadable with EDM2Pipeline.from_pretrained. "
                       "Nothing is written unless the whole export succeeds. See docs/integrations.md.")
    p.add_argument("source", metavar="SNAPSHOT", help="snapshot file, run folder (latest, longest EMA), "
                   "or one of the authors' published .pkl files / URLs")
    p.add_argument("--format", required=True, choices=["hf", "diffusers"], help="what to write")
    p.add_argument("--outdir", required=True, metavar="DIR", help="the folder to create")
    p.add_argument("--gnet", metavar="SNAPSHOT", help="diffusers: guiding network for guidance (CFG or autoguidance)")
    p.add_argument("--guidance", type=float, default=None, metavar="W", help="diffusers: default guidance_scale "
                   "(needs --gnet)")
    p.add_argument("--vae", metavar="DIR|NAME", help="diffusers, latent networks: the VAE (default: the one named "
                   "in the snapshot, from the Hugging Face cache)")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists and is not empty (never "
                   "one that is or holds the snapshot or an edm2 training run)")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.format == "hf":
        for opt in ("gnet", "guidance", "vae"):
            if getattr(args, opt) is not None:
                raise EDM2Error(f"--{opt}: only for --format diffusers (--format hf exports one network)")
        out = export_hf(args.source, args.outdir, overwrite=args.overwrite)
        print(f"{out}: Hugging Face model folder of {args.source} (Precond.from_pretrained)")
        return 0
    guidance = 1.0 if args.guidance is None else args.guidance
    check_guidance(guidance, args.gnet)
    try:
        from ..io.diffusers import export_diffusers
    except ImportError:
        raise EDM2Error("--format diffusers needs diffusers: pip install 'edm2[vae]'") from None
    out = export_diffusers(args.source, args.outdir, gnet=args.gnet, vae=args.vae, guidance=guidance,
                           overwrite=args.overwrite)
    print(f"{out}: EDM2Pipeline folder of {args.source} (EDM2Pipeline.from_pretrained)")
    return 0
