"""The committed corpus is reproducible, and workloads cut prompts to exact token counts."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from engines_compare import corpus
from engines_compare.corpus import Workload, build_prompts

ROOT = corpus.CORPUS_PATH.parents[2]


@pytest.fixture(scope="module")
def tok() -> object:
    from shared.config import ModelConfig
    from shared.models import load_tokenizer

    return load_tokenizer(ModelConfig(model="tiny-llama"))


def _built_with() -> str:
    return json.loads(corpus.CORPUS_PATH.read_text().splitlines()[0])["meta"]["python"]


def test_committed_corpus_is_reproduced_by_check() -> None:
    if _built_with().rsplit(".", 1)[0] != "%d.%d" % sys.version_info[:2]:
        pytest.skip(f"corpus built with Python {_built_with()}: docstrings differ between releases")
    r = subprocess.run([sys.executable, "-m", "engines_compare.corpus", "--check"], cwd=ROOT,
                       capture_output=True, text=True, env={"PYTHONHASHSEED": "random", "PATH": ""})
    assert r.returncode == 0, r.stderr


def test_check_fails_on_a_changed_file(tmp_path) -> None:
    changed = tmp_path / "corpus.jsonl"
    changed.write_text(corpus.CORPUS_PATH.read_text().replace("the", "teh", 1))
    assert corpus.main(["--check", "--path", str(changed)]) == 1


def test_corpus_records_are_ascii_sorted_and_numbered() -> None:
    lines = corpus.CORPUS_PATH.read_text().splitlines()
    meta = json.loads(lines[0])["meta"]
    records = [json.loads(line) for line in lines[1:]]
    assert meta["records"] == len(records) > 200
    assert [r["id"] for r in records] == list(range(len(records)))
    assert all(r["text"].isascii() and len(r["text"]) >= corpus.MIN_CHARS for r in records)


@pytest.mark.parametrize("kind,inp,out", [("fixed", (100, 100), (8, 8)), ("uniform", (20, 300), (4, 40)),
                                          ("grounded", (150, 150), (64, 64))])
def test_prompts_have_exact_token_counts_and_unique_tags(tok, kind, inp, out) -> None:
    w = Workload(kind, inp, out, seed=3)
    prompts = build_prompts(w, tok, 12, "run1-0")
    for i, p in enumerate(prompts):
        assert p.text.startswith(f"[run1-0#{i}] ")
        assert len(tok(p.text).input_ids) == p.prompt_tokens
        assert inp[0] <= p.prompt_tokens <= inp[1] and out[0] <= p.output_tokens <= out[1]
    assert all(p.prompt_tokens == inp[0] for p in prompts) or kind == "uniform"
    assert len({p.text for p in prompts}) == len(prompts)
    if kind == "uniform":
        assert len({p.prompt_tokens for p in prompts}) > 3
    if kind == "grounded":
        assert all("Repeat the following passage" in p.text and p.text.endswith(corpus.GROUNDED_TAIL) for p in prompts)


def test_prompts_are_deterministic_and_only_the_tag_differs_between_points(tok) -> None:
    w = Workload("uniform", (20, 200), (4, 40), seed=5)
    a, b = build_prompts(w, tok, 6, "x-0"), build_prompts(w, tok, 6, "x-0")
    assert a == b
    c = build_prompts(w, tok, 6, "x-1")
    assert [p.prompt_tokens for p in c] == [p.prompt_tokens for p in a]
    assert [p.text.split("] ", 1)[1][:40] for p in c] == [p.text.split("] ", 1)[1][:40] for p in a]


def test_shared_prefix_prompts_share_the_first_prefix_len_tokens(tok) -> None:
    w = Workload("shared-prefix", (64, 64), (8, 8), prefix_len=1024)
    prompts = build_prompts(w, tok, 4, "t")
    ids = [tok(p.text).input_ids for p in prompts]
    assert all(len(i) == 1024 + 64 for i in ids)
    assert all(i[:1024] == ids[0][:1024] for i in ids)
    assert len({tuple(i[1024:]) for i in ids}) == 4
    assert all(f"[t#{n}] " in p.text for n, p in enumerate(prompts))


def test_several_prefixes_are_each_shared_by_the_requests_that_drew_them(tok) -> None:
    w = Workload("shared-prefix", (40, 40), (8, 8), prefix_len=128, num_prefixes=3)
    ids = [tok(p.text).input_ids for p in build_prompts(w, tok, 24, "t")]
    assert all(len(i) == 128 + 40 for i in ids)
    heads = [tuple(i[:128]) for i in ids]
    assert len(set(heads)) == 3 and all(heads.count(h) >= 3 for h in set(heads))  # all drawn, each shared
    assert [tuple(i[:128]) for i in (tok(p.text).input_ids for p in build_prompts(w, tok, 24, "u"))] == heads  # seeded
    one = build_prompts(Workload("shared-prefix", (40, 40), (8, 8), prefix_len=128), tok, 2, "t")
    assert tuple(tok(one[0].text).input_ids[:128]) in set(heads)  # the first prefix is the one-prefix workload's


@pytest.mark.parametrize("kwargs,flag", [({"kind": "nope"}, "--workload"), ({"input_len": (5, 2)}, "--input-len"),
                                         ({"output_len": (1, 9)}, "--output-len"), ({"num_prefixes": 0}, "--num-prefixes")])
def test_workload_errors_name_the_flag(kwargs, flag) -> None:
    with pytest.raises(ValueError, match=flag):
        Workload(**kwargs)


def test_parse_range() -> None:
    assert corpus.parse_range("--input-len", "128") == (128, 128)
    assert corpus.parse_range("--input-len", "64:256") == (64, 256)
    with pytest.raises(ValueError, match="--input-len"):
        corpus.parse_range("--input-len", "a:b")
