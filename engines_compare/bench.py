"""``python -m engines_compare bench``: run the same prompts against each target, back to back.

Central rule: a comparison is one run. Every target gets the same prompts (built once per load
point from the versioned corpus), the same load points, on the same machine, one after the
other; ratios are always against the first target of that run.

For each target: start it (or take its URL), ask its model id and version, send ``--warmup``
requests, then for each load point (each ``--concurrency``, then each ``--request-rate``) send
``--num-requests`` requests and keep every request's raw record. Output lengths are forced with
``ignore_eos`` + ``max_tokens`` (or, with ``--no-ignore-eos``, a logit bias against EOS).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import math
import os
import secrets
import shlex
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from engines_compare import corpus, loadgen, machine, metrics, report, speculation, targets

RESULTS = Path(__file__).resolve().parent / "results"
SCHEMA = "engines_compare.bench/v1"


@dataclasses.dataclass(frozen=True, slots=True)
class BenchConfig:
    targets: tuple[str, ...]
    model: str = "gemma-3-270m"
    tokenizer: str | None = None  # default: the model's
    dtype: str = "auto"
    workload: corpus.Workload = corpus.Workload()
    num_requests: int = 64
    warmup: int = 2
    concurrency: tuple[int, ...] = ()
    request_rate: tuple[float, ...] = ()
    max_concurrency: int | None = None
    duration_s: float | None = None  # open loop: requests per point = rate x duration (else num_requests)
    seed: int = 0
    salt: str = ""  # opens every prompt tag; default: random per run, so no run reuses a cache
    ignore_eos: bool = True
    temperature: float = 0.0
    goodput_ms: tuple[tuple[str, float], ...] = ()
    out: Path | None = None
    timeout_s: float = 600.0
    start_timeout_s: float = 900.0
    progress: bool = True
    measure_bandwidth: bool = True
    step_flags: tuple[str, ...] = ()
    target_flags: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (step name, its own extra flags)
    priority: int | None = None

    def points(self) -> list[loadgen.LoadSpec]:
        closed = [loadgen.LoadSpec(concurrency=c, timeout_s=self.timeout_s) for c in self.concurrency]
        opened = [loadgen.LoadSpec(request_rate=r, max_concurrency=self.max_concurrency, seed=self.seed,
                                   timeout_s=self.timeout_s) for r in self.request_rate]
        return closed + opened or [loadgen.LoadSpec(concurrency=1, timeout_s=self.timeout_s)]

    def requests_at(self, point: loadgen.LoadSpec) -> int:
        if point.request_rate and self.duration_s:
            return max(1, math.ceil(point.request_rate * self.duration_s))
        return self.num_requests


def _list(kind: type, flag: str) -> Any:
    def parse(value: str) -> tuple:
        try:
            return tuple(kind(v) for v in value.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag}: expected a comma-separated list, got {value!r}") from None
    return parse


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--target", action="append", required=True,
                    help="URL, step name (step02_queue), 'null', or engine (llamacpp, vllm); repeat or comma-list")
    ap.add_argument("--model", default="gemma-3-270m", help="model for started targets and the tokenizer")
    ap.add_argument("--tokenizer", default=None, help="tokenizer to cut prompts with (default: --model)")
    ap.add_argument("--dtype", default="auto", help="dtype passed to step targets (default: auto)")
    ap.add_argument("--workload", default="fixed", choices=corpus.WORKLOADS)
    ap.add_argument("--input-len", default="128", help="prompt tokens: N, or LO:HI for uniform (default: 128)")
    ap.add_argument("--output-len", default="128", help="output tokens: N, or LO:HI for uniform (default: 128)")
    ap.add_argument("--prefix-len", type=int, default=1024, help="shared-prefix: common prefix tokens (default: 1024)")
    ap.add_argument("--num-prefixes", type=int, default=1, help="shared-prefix: distinct prefixes, one drawn per "
                    "request (seeded); more than a replica's cache holds shows what routing by prefix buys (default: 1)")
    ap.add_argument("--num-requests", type=int, default=64, help="requests per load point (default: 64)")
    ap.add_argument("--warmup", type=int, default=2, help="requests sent before measuring, per target (default: 2)")
    ap.add_argument("--concurrency", type=_list(int, "--concurrency"), default=(),
                    help="closed loop: requests in flight; a list sweeps (1,4,16)")
    ap.add_argument("--request-rate", type=_list(float, "--request-rate"), default=(),
                    help="open loop: Poisson arrivals per second (seeded); a list sweeps")
    ap.add_argument("--max-concurrency", type=int, default=None, help="open loop: cap on requests in flight")
    ap.add_argument("--duration", type=float, default=None, metavar="S",
                    help="open loop: send rate x S requests per rate point instead of --num-requests "
                         "(e.g. an overload run: --request-rate 10 --duration 60)")
    ap.add_argument("--seed", type=int, default=0, help="prompt lengths, passages and arrivals (default: 0)")
    ap.add_argument("--salt", default="", help="prompt tag prefix (default: random, so caches never hit)")
    ap.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                    help="force output length with a logit bias against EOS instead of ignore_eos")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--goodput", nargs="+", default=[], metavar="KEY:MS", help="SLOs, e.g. ttft:500 tpot:50")
    ap.add_argument("--out", type=Path, default=None, help="output directory (default: results/local/<time>)")
    ap.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    ap.add_argument("--start-timeout", type=float, default=900.0, help="seconds to wait for a started target")
    ap.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    ap.add_argument("--step-flags", default="", help="extra flags for started step targets, one string "
                    "(e.g. '--max-seqs 64 --linear-backend torch')")
    ap.add_argument("--target-flags", action="append", default=[], metavar="STEP=FLAGS",
                    help="extra flags for one started step (or labelled step, step08_quant:int4) only, after --step-flags; repeatable "
                         "(e.g. 'step06_backpressure=--max-waiting-requests 0')")
    ap.add_argument("--priority", type=int, default=None, metavar="NICE",
                    help="autogroup nice (-20..19) for the load generator and every server it starts; "
                         "-15 keeps other sessions' work from distorting a run on a small machine (needs root)")
    ap.add_argument("--no-bandwidth", dest="measure_bandwidth", action="store_false",
                    help="skip the memory bandwidth measurement")


def config_from_args(a: argparse.Namespace) -> BenchConfig:
    workload = corpus.Workload(a.workload, corpus.parse_range("--input-len", a.input_len),
                               corpus.parse_range("--output-len", a.output_len), a.prefix_len, a.seed, a.num_prefixes)
    if a.num_requests < 1:
        raise ValueError(f"--num-requests must be >= 1, got {a.num_requests}")
    if a.duration is not None and a.duration <= 0:
        raise ValueError(f"--duration must be > 0 seconds, got {a.duration}")
    if a.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {a.warmup}")
    if a.priority is not None and not -20 <= a.priority <= 19:
        raise ValueError(f"--priority must be a nice value in -20..19, got {a.priority}")
    return BenchConfig(
        targets=tuple(a.target), model=a.model, tokenizer=a.tokenizer, dtype=a.dtype, workload=workload,
        num_requests=a.num_requests, warmup=a.warmup, concurrency=a.concurrency, request_rate=a.request_rate,
        max_concurrency=a.max_concurrency, duration_s=a.duration, seed=a.seed, salt=a.salt, ignore_eos=a.ignore_eos,
        temperature=a.temperature, goodput_ms=tuple(metrics.parse_goodput(a.goodput).items()), out=a.out,
        timeout_s=a.timeout, start_timeout_s=a.start_timeout, progress=a.progress,
        measure_bandwidth=a.measure_bandwidth, step_flags=tuple(shlex.split(a.step_flags)), priority=a.priority,
        target_flags=tuple(_target_flags(v) for v in a.target_flags))


def _target_flags(value: str) -> tuple[str, tuple[str, ...]]:
    name, sep, flags = value.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"--target-flags: expected STEP=FLAGS, got {value!r}")
    return name.strip(), tuple(shlex.split(flags))


def eos_ids(tok: Any) -> list[int]:
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    turn = tok.convert_tokens_to_ids("<end_of_turn>")
    if isinstance(turn, int) and turn != tok.unk_token_id:
        ids.add(turn)
    return sorted(ids)


def request_body(cfg: BenchConfig, model_id: str, p: corpus.Prompt, eos: Sequence[int]) -> bytes:
    body: dict[str, Any] = {"model": model_id, "prompt": p.text, "max_tokens": p.output_tokens,
                            "temperature": cfg.temperature, "stream": True, "stream_options": {"include_usage": True}}
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    else:
        body["logit_bias"] = {str(i): -100 for i in eos}
    return json.dumps(body).encode()


def _measure(ep: loadgen.Endpoint, bodies: list[bytes], prompts: list[corpus.Prompt], spec: loadgen.LoadSpec,
             desc: str, progress: bool) -> list[metrics.RequestRecord]:
    from tqdm import tqdm

    with tqdm(total=len(bodies), desc=desc, unit="req", disable=not progress, leave=False) as bar:
        return asyncio.run(loadgen.run_load(ep, bodies, [p.output_tokens for p in prompts], spec,
                                            on_done=lambda: bar.update(1)))


def _run_target(cfg: BenchConfig, spec: targets.TargetSpec, prompt_sets: dict[str, list[corpus.Prompt]],
                eos: list[int], out: Path) -> list[dict[str, Any]]:
    own = tuple(f for name, flags in cfg.target_flags if name == spec.name for f in flags)
    opts = targets.TargetOptions(cfg.model, cfg.dtype, cfg.start_timeout_s, cfg.workload.output_len[1], out,
                                 cfg.step_flags + own, cfg.priority, engine_flags=own if spec.kind == "engine" else ())
    runs = []
    with targets.running(spec, opts) as t:
        ep = loadgen.Endpoint.parse(t.url)
        warm = prompt_sets["warmup"]
        if cfg.warmup:
            _measure(ep, [request_body(cfg, t.model_id, p, eos) for p in warm], warm,
                     loadgen.LoadSpec(concurrency=len(warm), timeout_s=cfg.timeout_s), f"{spec.name} warmup",
                     cfg.progress)
        for point in cfg.points():
            prompts = prompt_sets[point.label()]
            bodies = [request_body(cfg, t.model_id, p, eos) for p in prompts]
            before = speculation.counters(t.url)
            with ServerMemory(t.pid) as memory:
                records = _measure(ep, bodies, prompts, point, f"{spec.name} {point.label()}", cfg.progress)
            spec_decode = speculation.delta(before, speculation.counters(t.url))
            summary = metrics.summarize(records, dict(cfg.goodput_ms) or None)
            runs.append({"target": spec.name, "kind": spec.kind, "url": t.url, "model_id": t.model_id,
                         "engine_version": t.version, "dtype": t.dtype, "point": point.label(),
                         "load": dataclasses.asdict(point), "summary": dataclasses.asdict(summary),
                         "memory": memory.result(), "speculation": spec_decode,
                         "requests": [_record_dict(r) for r in records]})
    return runs


def rss_mib(pid: int | None) -> float | None:
    """A process's resident memory (``VmRSS`` in ``/proc/PID/status``), None where unreadable."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return None


class ServerMemory:
    """A started server's RSS before a load point, its peak during it (sampled every
    ``interval_s``), and after it, once ``settle_s`` have let the server finish its cleanup."""

    def __init__(self, pid: int | None, interval_s: float = 0.5, settle_s: float = 2.0) -> None:
        self.pid, self.interval_s, self.settle_s = pid, interval_s, settle_s
        self.before = self.after = self.peak = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ServerMemory:
        self.before = self.peak = rss_mib(self.pid)
        if self.before is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            now = rss_mib(self.pid)
            if now is not None and (self.peak is None or now > self.peak):
                self.peak = now

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            time.sleep(self.settle_s)
            self.after = rss_mib(self.pid)

    def result(self) -> dict[str, float | None]:
        return {"rss_before_mib": self.before, "rss_peak_mib": self.peak, "rss_after_mib": self.after}


def _record_dict(r: metrics.RequestRecord) -> dict[str, Any]:
    d = {f.name: getattr(r, f.name) for f in dataclasses.fields(r)}  # asdict deep-copies: slow
    d["start"], d["end"] = round(r.start, 6), round(r.end, 6)
    d["chunk_times"] = [round(t, 6) for t in r.chunk_times]
    return d


def build_prompt_sets(cfg: BenchConfig, tok: Any, salt: str) -> dict[str, list[corpus.Prompt]]:
    """The warmup prompts and one prompt set per load point; tags make every prompt unique."""
    text = corpus.load_corpus()
    sets = {"warmup": corpus.build_prompts(cfg.workload, tok, max(cfg.warmup, 1), f"{salt}-w", text)}
    for i, point in enumerate(cfg.points()):
        sets[point.label()] = corpus.build_prompts(cfg.workload, tok, cfg.requests_at(point), f"{salt}-{i}", text)
    return sets


def run(cfg: BenchConfig) -> tuple[dict[str, Any], Path]:
    """Run the whole benchmark; returns the results document and the directory it was written to."""
    from shared.config import ModelConfig
    from shared.models import load_tokenizer

    specs = targets.parse_targets(list(cfg.targets))
    if cfg.priority is not None and not targets.set_priority(os.getpid(), cfg.priority):
        print(f"--priority {cfg.priority}: refused (needs root); running at normal priority")
    started = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = cfg.out or RESULTS / "local" / started
    out.mkdir(parents=True, exist_ok=True)
    salt = cfg.salt or secrets.token_hex(3)
    tok = load_tokenizer(ModelConfig(model=cfg.tokenizer or cfg.model))
    prompt_sets = build_prompt_sets(cfg, tok, salt)
    info = machine.collect(measure=cfg.measure_bandwidth, size_mb=128)
    doc: dict[str, Any] = {
        "schema": SCHEMA, "started": started, "config": _config_dict(cfg, salt), "machine": dataclasses.asdict(info),
        "git": machine.git_info(), "model": cfg.model, "dtype": cfg.dtype,
        "corpus": corpus.VERSION, "runs": [], "errors": []}
    for spec in specs:
        try:
            doc["runs"].extend(_run_target(cfg, spec, prompt_sets, eos_ids(tok), out))
        except Exception as e:  # one failing target must not lose the others' results
            doc["errors"].append({"target": spec.name, "error": f"{type(e).__name__}: {e}"})
        report.write_json(doc, out / "results.partial.json")  # a run stopped later keeps this target's
    (out / "results.partial.json").unlink(missing_ok=True)
    doc["ratios"] = report.ratios(doc["runs"])
    report.write_json(doc, out / "results.json")
    report.write_csv(doc, out / "summary.csv", out / "requests.csv")
    if doc["runs"]:
        report.write_plots(doc, out)
    return doc, out


def _config_dict(cfg: BenchConfig, salt: str) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["out"] = str(cfg.out) if cfg.out else None
    d["salt"] = salt
    d["goodput_ms"] = dict(cfg.goodput_ms)
    return d


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engines_compare bench", description=__doc__.splitlines()[0])
    add_arguments(ap)
    a = ap.parse_args(argv)
    try:
        cfg = config_from_args(a)
        targets.parse_targets(list(cfg.targets))
        doc, out = run(cfg)
    except ValueError as e:  # bad flags, or prompts that cannot be built from them
        ap.error(str(e))
    print(f"machine: {machine.MachineInfo(**doc['machine']).describe()}; commit {doc['git']['commit']}")
    print(f"model {cfg.model} ({cfg.dtype}), workload {cfg.workload.kind}, "
          f"{cfg.num_requests} requests per point")
    print(report.format_table(doc))
    print(f"results: {out}")
    return 1 if doc["errors"] else 0
