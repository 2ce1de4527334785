"""``adapterkit hub serve | token create | gc``, ``push``, ``pull``, ``search``."""

from __future__ import annotations

import argparse

from adapterkit.errors import shown


def cmd_hub_serve(args: argparse.Namespace) -> None:
    from adapterkit.hub.server import serve
    from adapterkit.hub.store import Limits

    print(f"adapterkit hub on http://{args.host}:{args.port} (root {args.root}{', private' if args.private else ''})")
    limits = Limits(max_file_bytes=int(args.max_file_mb * 2**20), max_upload_bytes=int(args.max_upload_mb * 2**20))
    serve(args.root, args.host, args.port, args.private, limits)


def cmd_hub_token(args: argparse.Namespace) -> None:
    from adapterkit.hub.store import Store

    print(Store(args.root).create_token(args.owner))


def cmd_hub_gc(args: argparse.Namespace) -> None:
    from adapterkit.hub.store import Store

    print(f"removed {len(Store(args.root).collect())} files no revision uses")


def cmd_push(args: argparse.Namespace) -> None:
    from adapterkit.hub import push

    card = push(args.folder, args.name, args.hub, args.tag, args.token, args.license, args.task)
    print(f"pushed {args.name} revision {card['revision']} ({', '.join(map(shown, card['files']))})")
    if card["skipped"]:
        print(f"not uploaded (only safetensors and JSON are shared): {', '.join(card['skipped'])}")


def cmd_pull(args: argparse.Namespace) -> None:
    from adapterkit.hub import pull

    print(pull(args.ref, args.hub, args.token))


def cmd_search(args: argparse.Namespace) -> None:
    from adapterkit.hub import search

    for card in search(args.query, args.hub, args.token, method=args.method, task=args.task):
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in (card["metrics"] or {}).items())
        fields = (card["name"], card["method"] or "-", card["task"] or "-", card["base_model"] or "-", metrics)
        print(shown("  ".join(fields)))  # a hub's text never reaches the terminal as escape sequences


def add_parsers(sub) -> None:
    hub = sub.add_parser("hub", help="run an adapter hub: serve, token create, gc").add_subparsers(
        dest="hub", required=True
    )
    serve = hub.add_parser("serve", help="serve adapters over HTTP (JSON API, HF download protocol, HTML)")
    serve.add_argument("--root", required=True, help="the hub's folder (files + index.sqlite)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8765)
    serve.add_argument("--private", action="store_true", help="reads need a token too")
    serve.add_argument("--max-file-mb", type=float, default=256, help="largest file accepted")
    serve.add_argument("--max-upload-mb", type=float, default=1024, help="largest upload (all its files) accepted")
    serve.set_defaults(func=cmd_hub_serve)
    token = hub.add_parser("token", help="manage upload tokens").add_subparsers(dest="token", required=True)
    create = token.add_parser("create", help="print a new upload token for OWNER (stored hashed)")
    create.add_argument("owner")
    create.add_argument("--root", required=True)
    create.set_defaults(func=cmd_hub_token)
    gc = hub.add_parser("gc", help="remove stored files no revision uses (every delete does it for its own)")
    gc.add_argument("--root", required=True)
    gc.set_defaults(func=cmd_hub_gc)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--hub", help="the hub's URL (default: $ADAPTERKIT_HUB or http://127.0.0.1:8765)")
    common.add_argument("--token", help="default: $ADAPTERKIT_HUB_TOKEN")
    push = sub.add_parser("push", parents=[common], help="upload an adapter folder or train output to a hub")
    push.add_argument("folder")
    push.add_argument("--name", required=True, help="owner/name")
    push.add_argument("--tag", action="append", default=[], help="a tag for this revision, repeatable")
    push.add_argument("--license", default="unknown")
    push.add_argument("--task", help="default: the train run's task")
    push.set_defaults(func=cmd_push)
    pull = sub.add_parser("pull", parents=[common], help="download owner/name[@tag|revision] into the cache")
    pull.add_argument("ref")
    pull.set_defaults(func=cmd_pull)
    find = sub.add_parser("search", parents=[common], help="find adapters on a hub")
    find.add_argument("query", nargs="?", default="")
    find.add_argument("--method")
    find.add_argument("--task")
    find.set_defaults(func=cmd_search)
