"""`edm2 import-official SRC DEST`: a thin layer over `edm2.io.official.import_official`."""
from __future__ import annotations

from pathlib import Path

from ..io.official import convert_official_folder, import_official
from ..utils.errors import EDM2Error

HELP = "convert one of the authors' published EDM2 .pkl files (path or URL) into an edm2 snapshot, safely"


def register(sub) -> None:
    p = sub.add_parser(
        "import-official", help=HELP,
        description=HELP + ". The pickle is read with an allow-list unpickler: no code from the file is run, and "
        "the authors' dnnlib/torch_utils packages are not needed. URLs are downloaded once into the cache "
        "(its downloads folder; the cache is $EDM2_CACHE, default ~/.cache/edm2). With a folder of raw snapshots "
        "(network-snapshot-<kimg>-<sigma_rel>.pkl) as SRC, every one is converted into DEST.")
    p.add_argument("src", metavar="SRC", help="a published .pkl file, its URL, or a folder of raw snapshot .pkl files")
    p.add_argument("dest", metavar="DEST", help="output .safetensors file, or an existing folder "
                   "(the file is then named snapshot-<nimg>-<sigma_rel>.safetensors)")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default=None,
                   help="stored parameter type: fp32 (the published fp16 values widened exactly; the default for "
                   "one file) or fp16 (as published, half the size; loading widens them; the default for a folder)")
    p.set_defaults(func=run)


def run(args) -> int:
    if Path(args.src).is_dir():
        if not Path(args.dest).is_dir():
            raise EDM2Error(f"{args.dest}: with a folder as SRC, DEST must be an existing folder")
        out = convert_official_folder(args.src, args.dest, dtype=args.dtype or "fp16")
        print(f"{out}: converted the raw snapshots of {args.src}")
        return 0
    out = import_official(args.src, args.dest, dtype=args.dtype or "fp32")
    print(f"{out}: written from {args.src}")
    return 0
