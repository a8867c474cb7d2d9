"""The `mmdit-probe` command.

    mmdit-probe info toy                 # family, blocks, token layout, hook names
    mmdit-probe info ./my-sd3-dir --hooks
"""

from __future__ import annotations

import argparse

from .probe import load


def _info(args: argparse.Namespace) -> None:
    probe = load(args.model)
    print(probe.info())
    if args.hooks:
        print("\n".join(probe.hook_names))
    if args.prompt:
        print(probe.tokens(args.prompt))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mmdit-probe", description="Look inside MM-DiTs (SD3, SD3.5, Flux.1).")
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="describe a model: family, blocks, token layout, hook points")
    info.add_argument("model", help="preset name (e.g. toy, sd3-medium), hub id, or local pipeline directory")
    info.add_argument("--hooks", action="store_true", help="list every hook point name")
    info.add_argument("--prompt", help="also show this prompt's token table")
    info.set_defaults(run=_info)

    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
