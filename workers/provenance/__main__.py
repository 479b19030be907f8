"""``python -m workers.provenance``: what ``musespark trust …`` and ``musespark verify`` run.

They run worker code (c2pa, the watermark decoder), so the ``musespark`` command execs this
module rather than importing it (the bot side never imports worker code).

Exit codes of ``verify``: 0 provenance found (the job id is printed), 1 none found, 2 the file
cannot be read or is not a picture.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.errors import MuseSparkError, UserInputError
from core.settings import get_settings

EXIT_FOUND, EXIT_NOT_FOUND, EXIT_UNREADABLE = 0, 1, 2


def _trust_init(args: argparse.Namespace) -> int:
    from workers.provenance._trust import ANCHORS_FILE, CHAIN_FILE, KEY_FILE, create_local_chain

    settings = get_settings()
    folder = settings.trust_dir
    if (folder / KEY_FILE).exists() and not args.force:
        print(f"A signing chain already exists in {folder}; nothing changed. Use --force to "
              "replace it (the old root stays trusted, so earlier pictures still verify).")
        return 0
    create_local_chain(folder, force=args.force)
    print(f"Made a local root CA, an intermediate CA and a signing certificate in {folder}:\n"
          f"  {CHAIN_FILE} (signing certificate and intermediate), {KEY_FILE} (its key, 0600),"
          f"\n  {ANCHORS_FILE} (the root: what verify trusts).\n"
          "The CAs' own keys were not kept. Workers sign every picture with this chain unless "
          "MUSESPARK_SIGNING_CERT and MUSESPARK_SIGNING_KEY name another.")
    if settings.signing_cert is not None:
        print("Note: MUSESPARK_SIGNING_CERT is set, so workers use that chain, not this one.")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from core.store import Store
    from workers.provenance._verify import verify_bytes

    path: Path = args.file
    try:
        data = path.read_bytes()
    except OSError as exc:
        print(f"Cannot read {path}: {exc.strerror or exc}.", file=sys.stderr)
        return EXIT_UNREADABLE
    settings = get_settings()
    store = Store(settings.resolved_database_url)
    store.upgrade()
    try:
        result = verify_bytes(data, path.name, settings=settings, store=store)
    except UserInputError as exc:
        print(exc.user_message, file=sys.stderr)
        return EXIT_UNREADABLE
    print(result.text())
    if result.found:
        print(f"job: {result.job_id}")
        return EXIT_FOUND
    return EXIT_NOT_FOUND


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="musespark", description=(
        "Provenance of MuseSpark's pictures: signing keys and verification."))
    sub = parser.add_subparsers(dest="command", required=True)
    trust = sub.add_parser("trust", help="signing keys for the pictures' C2PA manifests")
    trust_sub = trust.add_subparsers(dest="trust_command", required=True)
    init = trust_sub.add_parser(
        "init", help="make a local CA and signing certificate (offline)",
        description="Make a local root CA, an intermediate CA and a signing certificate under "
        "DATA_DIR/trust, offline. Workers make it themselves on first start when it is missing.")
    init.add_argument("--force", action="store_true",
                      help="replace an existing chain (its root stays trusted)")
    init.set_defaults(func=_trust_init)
    verify = sub.add_parser(
        "verify", help="say where a picture comes from",
        description="Read a picture's C2PA manifest (and check its signature chain), its "
        "invisible watermark, and what this deployment's store knows of the job. Exit 0 when "
        "provenance was found (the job id is printed), 1 when not, 2 when the file is "
        "unreadable.")
    verify.add_argument("file", type=Path)
    verify.set_defaults(func=_verify)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except MuseSparkError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_UNREADABLE


if __name__ == "__main__":
    sys.exit(main())
