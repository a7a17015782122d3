"""`edm2 dataset convert|encode|decode|info`: thin layer over edm2.data."""
from __future__ import annotations

import json

from ..data import convert_dataset, dataset_info, decode_dataset, encode_dataset, format_info
from ..data.convert import TRANSFORMS
from ..encoders import DEFAULT_VAE
from ..utils.distributed import configure_threads
from ..utils.units import parse_nimg


def _convert(args):
    names = None if args.class_names is None else [n.strip() for n in args.class_names.split(",")]
    r = convert_dataset(args.source, args.dest, resolution=args.resolution, transform=args.transform,
                        max_images=None if args.max_images is None else parse_nimg(args.max_images, "max_images"),
                        skip_bad=args.skip_bad, overwrite=args.overwrite, class_names=names,
                        use_labels=args.use_labels, workers=args.workers, split=args.split)
    for note in r.notes:
        print(f"note: {note}")
    for bad in r.skipped[:20]:
        print(f"skipped: {bad}")
    labels = f"{r.label_dim} classes" if r.label_dim else "no labels"
    print(f"wrote {r.num_images} images of {r.channels}x{r.resolution}x{r.resolution} ({labels}) to {r.dest}")


def _encode(args):
    configure_threads()
    r = encode_dataset(args.source, args.dest, vae=args.vae, batch_size=args.batch_size, device=args.device,
                       overwrite=args.overwrite, workers=args.workers)
    for note in r.notes:
        print(f"note: {note}")
    print(f"wrote {r.count} latents of 8x{r.resolution}x{r.resolution} ({r.computed} computed now) to {r.dest}")


def _decode(args):
    configure_threads()
    r = decode_dataset(args.source, args.dest, vae=args.vae, batch_size=args.batch_size, device=args.device,
                       overwrite=args.overwrite, workers=args.workers)
    print(f"wrote {r.count} images of 3x{r.resolution}x{r.resolution} to {r.dest}")


def _info(args):
    info = dataset_info(args.path)
    print(json.dumps(info, indent=2) if args.json else format_info(info))


def _vae_options(p):
    p.add_argument("--source", required=True, help="input dataset (folder or .zip)")
    p.add_argument("--dest", required=True, help="output dataset: a folder, or a .zip")
    p.add_argument("--vae", default=DEFAULT_VAE, help="diffusers AutoencoderKL: hub name or a save_pretrained "
                   "folder (default %(default)s)")
    p.add_argument("--batch", dest="batch_size", type=int, default=8, help="images per VAE call (default %(default)s)")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when present)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader processes reading items (default %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --dest (never the "
                   "source, a folder holding it or an edm2 training run)")


def register(sub):
    ds = sub.add_parser("dataset", help="prepare and inspect datasets",
                        description="Convert image collections, encode/decode VAE latents, inspect datasets.")
    cmds = ds.add_subparsers(dest="dataset_command", metavar="SUBCOMMAND")
    cmds.required = True

    p = cmds.add_parser("convert", help="image folder/zip/IDX/npz -> dataset (PNG + dataset.json)")
    p.add_argument("--source", required=True, help="folder or zip of images (labels from top-level sub-folders), "
                   "an existing dataset, an IDX images file (*-images-idx3-ubyte[.gz]), a .npz, a CIFAR-10/100 "
                   "tarball (python or binary version) or a Tiny-ImageNet folder")
    p.add_argument("--split", default=None, help="part of a CIFAR (train, test) or Tiny-ImageNet (train, val) "
                   "source (default: train)")
    p.add_argument("--dest", required=True, help="output: a folder, or a .zip")
    p.add_argument("--resolution", type=int, default=None, help="output N x N (default: the images' own size)")
    p.add_argument("--transform", choices=list(TRANSFORMS), default=None,
                   help="how to reach N x N (default: resize square images; non-square ones are an error)")
    p.add_argument("--max-images", default=None, help="keep at most this many (class-balanced when labelled)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images (counted) instead of failing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --dest (never the "
                   "source, a folder holding it or an edm2 training run)")
    p.add_argument("--class-names", default=None, help="comma-separated names of classes 0, 1, ...")
    p.add_argument("--no-labels", dest="use_labels", action="store_false", help="ignore labels in the source")
    p.add_argument("--workers", type=int, default=4, help="threads decoding/encoding images (default %(default)s)")
    p.set_defaults(func=_convert)

    p = cmds.add_parser("encode", help="image dataset -> Stable Diffusion VAE latents [8, H/8, W/8] (resumable)")
    _vae_options(p)
    p.set_defaults(func=_encode)

    p = cmds.add_parser("decode", help="latent dataset -> PNG images (decodes the posterior mean)")
    _vae_options(p)
    p.set_defaults(func=_decode)

    p = cmds.add_parser("info", help="count, resolution, channels, labels and class balance of a dataset")
    p.add_argument("path", help="dataset folder or .zip")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_info)
