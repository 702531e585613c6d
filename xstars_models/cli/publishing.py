"""``xstars push`` (a saved model to a Hub repo, with a model card and a manifest entry) and
``xstars convert`` (an official X-STARS checkpoint to an xstars-models folder)."""

from __future__ import annotations

import argparse
from typing import Any

from .flags import HelpFormatter

PUSH_EPILOG = """\
The token comes from the HF_TOKEN environment variable or a stored `hf auth login`, never from the
command line (it would show in the process list and shell history); the Hub is HF_ENDPOINT
(default huggingface.co). Uploads config.json, the weight files and a generated README.md model
card in one commit; re-pushing unchanged weights makes no new commit.

example:
  xstars push ./xstars-s2-spot org/xstars-s2-spot --manifest my_models.json --model-id xstars-s2-spot
  XSTARS_MANIFEST=my_models.json xstars info xstars-s2-spot
"""

CONVERT_EPILOG = """\
Reads the official DINO-style checkpoint safely (torch.load weights_only=True, allowing only
argparse.Namespace), keeps the --key network's backbone (the EMA teacher by default), drops the DINO
head, loads it strictly into the timm ViT and takes the normalisation and sensors from the
checkpoint's args. The source file's sha256 is recorded in config.json.

example:
  xstars convert checkpoint0100.pth --arch vit_small --sensor sentinel2_rgb ./xstars-official-s2
"""


def register(sub: Any) -> None:
    p = sub.add_parser("push", help="upload a saved model folder to a Hub repo (one commit, model card)",
                       epilog=PUSH_EPILOG, formatter_class=HelpFormatter)
    p.add_argument("model", help="folder written by save_pretrained (or any model id)")
    p.add_argument("repo_id", help="Hub repo, org/name (created if needed)")
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision", help="branch to commit to (created if needed; default: main)")
    p.add_argument("--message", default="Upload X-STARS model", help="commit message")
    p.add_argument("--license", default="mit", help="licence in the model card")
    p.add_argument("--description", default="", help="a paragraph for the model card")
    p.add_argument("--manifest", help="write the registry entry (repo, commit, sha256 per file) into this manifest")
    p.add_argument("--model-id", help="registry id for --manifest (default: the repo name)")
    p.add_argument("--overwrite-card", action="store_true",
                   help="replace the repo's README.md with the generated card (default: a card already on the Hub, "
                        "perhaps edited by its owners, is kept)")
    p.set_defaults(func=_push)

    p = sub.add_parser("convert", help="convert an official X-STARS checkpoint (.pth) into a model folder",
                       epilog=CONVERT_EPILOG, formatter_class=HelpFormatter)
    p.add_argument("checkpoint", help="official checkpoint .pth (student/teacher/args dicts)")
    p.add_argument("out", help="output folder (config.json + model.safetensors)")
    p.add_argument("--arch", help="vit_tiny|vit_small|vit_base|vit_large or a timm name (default: the checkpoint's args)")
    p.add_argument("--sensor", help="the sensor of the trunk's patch embedding, e.g. sentinel2_rgb, spot67_rgb, landsat8_rgb")
    p.add_argument("--key", default="teacher", choices=("teacher", "student"), help="which network to keep")
    p.set_defaults(func=_convert)


def _push(args: argparse.Namespace) -> int:
    from ..xstars import XStars

    model = XStars.from_pretrained(args.model, local_files_only=True)
    commit = model.push_to_hub(
        args.repo_id, private=args.private, revision=args.revision, commit_message=args.message,
        license=args.license, description=args.description, manifest_path=args.manifest, model_id=args.model_id,
        overwrite_card=args.overwrite_card,
    )
    print(f"pushed {args.model} to {args.repo_id}@{commit}")
    if args.manifest:
        print(f"manifest entry written to {args.manifest}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from ..convert import convert_official_checkpoint

    model = convert_official_checkpoint(args.checkpoint, args.out, arch=args.arch, sensor=args.sensor, key=args.key)
    print(f"converted {args.checkpoint} ({args.key}) -> {args.out}: {model.arch}, sensors {list(model.sensors)}")
    return 0
