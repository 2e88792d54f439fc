"""The prompt corpus (versioned, committed) and the workloads that cut prompts from it.

Central rule: prompts are a pure function of (corpus version, workload, seed, request number,
tokenizer), so every target in a run, and every later run, gets the same text. The corpus is the
docstrings of a fixed list of pure-Python standard-library modules: natural English that ships
with Python, needs no download, and is read in sorted order (never dict or file-system order).
Docstrings can change between Python releases, so the committed file records the version that
built it and ``--check`` names a version mismatch as the likely cause of a difference.

    python -m engines_compare.corpus           # (re)write engines_compare/data/corpus_v1.jsonl
    python -m engines_compare.corpus --check   # exit 1 unless the committed file is reproduced

Workloads (lengths are in tokens of the target's tokenizer, counting the BOS token it adds):

* ``fixed``: every prompt ``input_len`` tokens, every output ``output_len``.
* ``uniform``: lengths drawn uniformly (seeded) from ``LO:HI`` ranges.
* ``shared-prefix``: a common system prompt of ``prefix_len`` tokens, then a distinct suffix of
  ``input_len`` tokens (prefix caches should hit).
* ``grounded``: "Repeat the following passage" + a passage: the answer copies prompt spans.

Every prompt (after the shared prefix, if any) starts with a unique tag ``[TAG#i]`` so that
engines with prompt caches cannot reuse earlier requests.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import inspect
import json
import random
import sys
from pathlib import Path
from typing import Sequence

VERSION = "v1"
CORPUS_PATH = Path(__file__).parent / "data" / f"corpus_{VERSION}.jsonl"
MODULES = (
    "argparse", "ast", "asyncio.locks", "asyncio.queues", "bisect", "calendar", "cmd", "code", "codecs",
    "collections", "configparser", "contextlib", "copy", "csv", "dataclasses", "difflib", "doctest",
    "email.message", "enum", "filecmp", "fnmatch", "fractions", "ftplib", "functools", "gettext", "glob",
    "gzip", "heapq", "hmac", "html.parser", "http.client", "imaplib", "inspect", "ipaddress", "json",
    "logging", "mailbox", "mimetypes", "numbers", "optparse", "pathlib", "pdb", "pickle", "pprint",
    "queue", "random", "sched", "secrets", "selectors", "shlex", "shutil", "smtplib", "socketserver",
    "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "tokenize",
    "trace", "traceback", "typing", "unittest.case", "urllib.parse", "uuid", "warnings", "wave",
    "xml.dom.minidom", "zipfile",
)
MIN_CHARS = 200
WORKLOADS = ("fixed", "uniform", "shared-prefix", "grounded")
SYSTEM_INTRO = "You are a careful assistant. Answer using the reference notes below.\n\nReference notes:\n"
GROUNDED_INTRO = "Repeat the following passage exactly, word for word.\n\nPassage:\n"
GROUNDED_TAIL = "\n\nRepeated passage:\n"


def _docstrings(module_name: str) -> list[tuple[str, str]]:
    mod = importlib.import_module(module_name)
    out = [(module_name, inspect.getdoc(mod) or "")]
    for name in sorted(vars(mod)):
        obj = vars(mod)[name]
        if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            out.append((f"{module_name}.{name}", inspect.getdoc(obj) or ""))
    return out


def build_records() -> list[dict[str, object]]:
    """Every ASCII docstring of at least MIN_CHARS characters, deduplicated, in a fixed order."""
    seen: set[str] = set()
    records: list[dict[str, object]] = []
    for module_name in MODULES:
        for source, text in _docstrings(module_name):
            text = text.strip()
            if len(text) < MIN_CHARS or not text.isascii() or text in seen:
                continue
            seen.add(text)
            records.append({"id": len(records), "source": source, "text": text})
    return records


def render(records: list[dict[str, object]]) -> str:
    body = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    meta = {"corpus": VERSION, "python": ".".join(map(str, sys.version_info[:3])), "records": len(records),
            "sha256": hashlib.sha256(body.encode()).hexdigest()}
    return json.dumps({"meta": meta}, sort_keys=True) + "\n" + body


def load_corpus(path: Path = CORPUS_PATH) -> list[str]:
    """The passages of the committed corpus, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines[1:]]


@dataclasses.dataclass(frozen=True, slots=True)
class Workload:
    kind: str = "fixed"
    input_len: tuple[int, int] = (128, 128)  # LO, HI (equal for fixed)
    output_len: tuple[int, int] = (128, 128)
    prefix_len: int = 1024  # shared-prefix only
    seed: int = 0
    num_prefixes: int = 1  # shared-prefix: distinct system prompts, one drawn (seeded) per request

    def __post_init__(self) -> None:
        if self.kind not in WORKLOADS:
            raise ValueError(f"--workload must be one of {', '.join(WORKLOADS)}, got {self.kind!r}")
        for flag, (lo, hi) in (("--input-len", self.input_len), ("--output-len", self.output_len)):
            if not 1 <= lo <= hi:
                raise ValueError(f"{flag} must satisfy 1 <= LO <= HI, got {lo}:{hi}")
            if self.kind == "fixed" and lo != hi:
                raise ValueError(f"{flag}: the fixed workload takes one length, got {lo}:{hi} (use --workload uniform)")
        if self.kind == "shared-prefix" and self.prefix_len < 2:
            raise ValueError(f"--prefix-len must be >= 2, got {self.prefix_len}")
        if self.num_prefixes < 1:
            raise ValueError(f"--num-prefixes must be >= 1, got {self.num_prefixes}")


@dataclasses.dataclass(frozen=True, slots=True)
class Prompt:
    text: str
    prompt_tokens: int  # as the tokenizer counts it, BOS included
    output_tokens: int


def parse_range(flag: str, value: str) -> tuple[int, int]:
    """``"128"`` -> (128, 128); ``"64:256"`` -> (64, 256)."""
    lo, _, hi = value.partition(":")
    try:
        return int(lo), int(hi or lo)
    except ValueError:
        raise ValueError(f"{flag}: expected N or LO:HI, got {value!r}") from None


def _count(tok: object, text: str) -> int:
    return len(tok(text).input_ids)


def fit(tok: object, head: str, body: str, tail: str, n: int) -> tuple[str, int]:
    """``head + cut(body) + tail`` with exactly ``n`` tokens, cutting ``body`` at a token boundary.

    Returns the text and its token count: ``n`` unless no cut reaches it exactly (rare: a merge
    across the cut), then the nearest count below ``n``."""
    ids = tok(body, add_special_tokens=False).input_ids

    def attempt(k: int) -> tuple[str, int]:
        text = head + tok.decode(ids[:k]) + tail
        return text, _count(tok, text)

    k = max(0, min(len(ids), n - attempt(0)[1]))
    best: tuple[str, int] | None = None
    for _ in range(8):
        text, got = attempt(k)
        if got == n:
            return text, got
        if got < n and (best is None or got > best[1]):
            best = (text, got)
        k = max(0, min(len(ids), k + (n - got)))
    for k2 in range(max(0, k - 4), min(len(ids), k + 4) + 1):
        text, got = attempt(k2)
        if got == n:
            return text, got
        if got < n and (best is None or got > best[1]):
            best = (text, got)
    if best is None:
        raise ValueError(f"--input-len {n} is shorter than the fixed parts of the prompt ({attempt(0)[1]} tokens)")
    return best


def _passage_text(corpus: Sequence[str], rng: random.Random, chars: int) -> str:
    i, parts, total = rng.randrange(len(corpus)), [], 0
    while total < chars:
        parts.append(corpus[i % len(corpus)])
        total += len(parts[-1]) + 2
        i += 1
    return "\n\n".join(parts)


def build_prompts(w: Workload, tok: object, n: int, tag: str, corpus: Sequence[str] | None = None) -> list[Prompt]:
    """``n`` prompts of workload ``w``; ``tag`` (unique per run and sweep point) opens each one."""
    corpus = corpus if corpus is not None else load_corpus()
    systems = [""]
    if w.kind == "shared-prefix":
        systems = []
        for k in range(w.num_prefixes):  # the first keeps the seed it always had
            body = _passage_text(corpus, random.Random(f"{w.seed}:system" + (f":{k}" if k else "")), w.prefix_len * 8 + 256)
            system, got = fit(tok, SYSTEM_INTRO, body, "", w.prefix_len)
            if got != w.prefix_len:
                raise ValueError(f"--prefix-len {w.prefix_len}: could not cut the system prompt exactly ({got})")
            systems.append(system + "\n\n")
    prompts = []
    for i in range(n):
        rng = random.Random(f"{w.seed}:{i}")  # the same lengths and text whatever the tag
        in_len, out_len = rng.randint(*w.input_len), rng.randint(*w.output_len)
        system = systems[random.Random(f"{w.seed}:prefix:{i}").randrange(len(systems))]
        head = f"{system}[{tag}#{i}] " + (GROUNDED_INTRO if w.kind == "grounded" else "")
        tail = GROUNDED_TAIL if w.kind == "grounded" else ""
        target = in_len + (w.prefix_len if w.kind == "shared-prefix" else 0)
        text, got = fit(tok, head, _passage_text(corpus, rng, in_len * 8 + 256), tail, target)
        prompts.append(Prompt(text, got, out_len))
    return prompts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engines_compare.corpus", description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 unless the committed corpus is reproduced")
    ap.add_argument("--path", type=Path, default=CORPUS_PATH, help="corpus file (default: %(default)s)")
    a = ap.parse_args(argv)
    text = render(build_records())
    if not a.check:
        a.path.write_text(text, encoding="utf-8")
        print(f"wrote {a.path} ({len(text.splitlines()) - 1} passages)")
        return 0
    committed = a.path.read_text(encoding="utf-8") if a.path.exists() else ""
    if committed == text:
        print(f"{a.path}: reproduced exactly")
        return 0
    meta = json.loads(committed.splitlines()[0])["meta"] if committed else {}
    here = ".".join(map(str, sys.version_info[:3]))
    hint = f" (built with Python {meta.get('python')}, this is {here})" if meta.get("python") != here else ""
    print(f"{a.path}: differs from a fresh build{hint}; rebuild with python -m engines_compare.corpus",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
