"""``python -m engines_compare conform --url URL [--url URL ...]``: the feature matrix.

Each row is a check, each column an engine: ``ok``, ``FAIL`` or ``--`` (refused cleanly, i.e.
unsupported). Failures are listed with their reasons below the table. The exit code is 1 when
any check failed, so the command can gate a CI job.
"""
from __future__ import annotations

import argparse
import dataclasses
import json

from engines_compare.conformance import CHECKS, run_conformance

_MARK = {"pass": "ok", "fail": "FAIL", "unsupported": "--"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engines_compare conform", description=__doc__.splitlines()[0])
    ap.add_argument("--url", action="append", required=True, help="base URL of a server (repeatable)")
    ap.add_argument("--model", default=None, help="model id to request (default: the first listed)")
    ap.add_argument("--only", nargs="*", default=None, choices=sorted(CHECKS), help="run only these checks")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    results = {url: run_conformance(url, args.model, args.only) for url in args.url}
    names = args.only or list(CHECKS)
    width = max(map(len, names)) + 2
    print("check".ljust(width) + "feature".ljust(26) + "".join(f"[{i}]".ljust(7) for i in range(len(args.url))))
    for n, name in enumerate(names):
        marks = "".join(_MARK[results[url][n].status].ljust(7) for url in args.url)
        print(name.ljust(width) + CHECKS[name][0].ljust(26) + marks)
    for i, url in enumerate(args.url):
        rs = results[url]
        print(f"[{i}] {url}: {sum(r.status == 'pass' for r in rs)} passed, "
              f"{sum(r.status == 'fail' for r in rs)} failed, {sum(r.status == 'unsupported' for r in rs)} unsupported")
        for r in rs:
            if r.status != "pass":
                print(f"    {r.status}: {r.name}: {r.detail.splitlines()[0] if r.detail else ''}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({url: [dataclasses.asdict(r) for r in rs] for url, rs in results.items()}, f, indent=1)
    return int(any(r.status == "fail" for rs in results.values() for r in rs))


if __name__ == "__main__":
    raise SystemExit(main())
