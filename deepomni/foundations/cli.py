"""``deepomni foundations build | verify``: make a foundation set; check a shipped one against its manifest."""

from __future__ import annotations

import argparse
import json

from ..config import add_flags, flag_values, load_config


def add_build_args(p: argparse.ArgumentParser) -> None:
    from .build import FoundationsConfig

    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_flags(p, FoundationsConfig)


def cmd_build(args: argparse.Namespace) -> int:
    from .build import FoundationsConfig, build

    build(load_config(FoundationsConfig, None, flag_values(args, FoundationsConfig)), progress=not args.quiet)
    return 0


def add_verify_args(p: argparse.ArgumentParser) -> None:
    from .files import DEFAULT

    p.add_argument("name", nargs="?", default=DEFAULT, help=f"a shipped set's name or a set's directory "
                                                            f"(default {DEFAULT})")


def cmd_verify(args: argparse.Namespace) -> int:
    from .files import locate, manifest, verify

    problems = verify(args.name)
    m = manifest(args.name)
    if problems:
        print(f"{locate(args.name)}: {len(problems)} problem(s)\n  " + "\n  ".join(problems))
        return 1
    print(f"{locate(args.name)}: {len(m['files'])} files match the manifest (sha256)")
    print(json.dumps({k: m["figures"][k] for k in m["figures"]}, indent=1)[:3000])
    return 0


def add_foundations_command(subparsers: argparse._SubParsersAction) -> None:
    help_text = "the pretrained speech encoder and base LLM a run starts from: build them, verify the shipped set"
    p = subparsers.add_parser("foundations", help=help_text, description=help_text)
    sub = p.add_subparsers(dest="foundations_cmd", required=True)
    for name, add, fn, h in (("build", add_build_args, cmd_build, "build a foundation set (deepomni/foundations/build.py)"),
                             ("verify", add_verify_args, cmd_verify, "check a set's files against its manifest")):
        sp = sub.add_parser(name, help=h, description=h)
        add(sp)
        sp.set_defaults(fn=fn)
