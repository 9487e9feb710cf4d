"""The command line ``python -m metarec.storage COMMAND ...`` (used by the serving init container)."""

from __future__ import annotations

import argparse
import json
import sys

from metarec.storage.errors import StorageError
from metarec.storage.objects import exists
from metarec.storage.prefixes import download_dir, upload_dir
from metarec.storage.promotion import MANIFEST_NAME, promote

# The package docstring's first line, as `--help` showed it when the package was one module.
DESCRIPTION = "Storage for local paths and ``gs://`` URIs alike."


def main(argv: list[str] | None = None) -> int:
    """Runs ``python -m metarec.storage COMMAND ...``; prints a JSON summary on success.

    Args:
        argv: Arguments (``sys.argv[1:]`` when None). Commands: ``download-dir SRC DST
            [--require-complete]``, ``upload-dir SRC DST``, ``promote STAGING FINAL``, ``exists URI``.

    Returns:
        The exit status: 0 on success, 1 on a :class:`StorageError` (message on stderr), for
        ``exists`` 0 when present and 1 when absent.
    """
    parser = argparse.ArgumentParser(prog="python -m metarec.storage", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("download-dir", help="download a gs:// prefix into a local folder")
    fetch.add_argument("source")
    fetch.add_argument("destination")
    fetch.add_argument(
        "--require-complete", action="store_true", help=f"fail unless the prefix holds {MANIFEST_NAME}"
    )
    push = commands.add_parser("upload-dir", help="upload a local folder under a gs:// prefix")
    push.add_argument("source")
    push.add_argument("destination")
    promotion = commands.add_parser("promote", help="copy a staging prefix to its final name, manifest last")
    promotion.add_argument("staging")
    promotion.add_argument("final")
    probe = commands.add_parser("exists", help="exit 0 when an object or non-empty prefix exists")
    probe.add_argument("uri")
    args = parser.parse_args(argv)
    try:
        if args.command == "download-dir":
            if not args.source.strip():
                # The serving Deployment's MODEL_URI (its pod template annotation metarec.io/model-uri)
                # is empty until deploy_model sets a version; "" would otherwise name the working folder.
                raise StorageError(
                    "no source given (empty MODEL_URI): no model version is deployed yet; deploy_model "
                    "sets it (docs/cluster.md, 'Who owns the model version')"
                )
            written = download_dir(args.source, args.destination, require_complete=args.require_complete)
            summary: dict = {"downloaded": len(written), "destination": args.destination}
        elif args.command == "upload-dir":
            summary = {
                "uploaded": len(upload_dir(args.source, args.destination)),
                "destination": args.destination,
            }
        elif args.command == "promote":
            summary = {"promoted": len(promote(args.staging, args.final)["files"]), "final": args.final}
        else:
            found = exists(args.uri)
            print(json.dumps({"uri": args.uri, "exists": found}))
            return 0 if found else 1
    except StorageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0
