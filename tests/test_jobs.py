"""Job files: one schema in YAML and JSON, every error named (shot, field, expected, got), safe output names."""

from __future__ import annotations

import doctest
import json
from pathlib import Path

import pytest
import yaml

import memctl.job_outputs
import memctl.jobfile
import memctl.jobs
from memctl.jobs import JobError, load_job, name_problem, parse_job

SHOT = {"id": "seven", "prompt": "a seven", "seeds": [0, 1]}


def job(**top) -> dict:
    return {"model": "digits", "shots": [dict(SHOT)], **top}


def errors_of(data) -> list[str]:
    with pytest.raises(JobError) as info:
        parse_job(data)
    return info.value.errors


@pytest.mark.parametrize("module", [memctl.jobs, memctl.jobfile, memctl.job_outputs], ids=lambda m: m.__name__)
def test_doctest(module):
    result = doctest.testmod(module)
    assert result.failed == 0
    assert result.attempted > 0


def test_yaml_and_json_are_one_schema(tmp_path: Path):
    data = job(block_map="map.safetensors", batch_size=2, defaults={"steps": 4, "guidance": 3.0},
               shots=[{"id": "a", "prompt": "a seven", "seeds": {"start": 3, "count": 3},
                       "fidelity": {"from": -1, "to": 1, "count": 3}, "window": [0.2, 0.8]}])  # fmt: skip
    (tmp_path / "j.yaml").write_text(yaml.safe_dump(data))
    (tmp_path / "j.json").write_text(json.dumps(data))
    a, b = load_job(tmp_path / "j.yaml"), load_job(tmp_path / "j.json")
    assert a.outputs() == b.outputs()
    assert a.base == tmp_path.resolve()
    names = [o.name for o in a.outputs()]
    assert names[:3] == ["a/f-1.00_s3.png", "a/f-1.00_s4.png", "a/f-1.00_s5.png"]
    assert len(names) == 9
    assert len(set(names)) == 9
    o = a.outputs()[4]
    assert (o.options.fidelity, o.options.seed, o.options.steps, o.options.guidance) == (0.0, 4, 4, 3.0)
    assert (o.options.start, o.options.stop, o.options.batch_size) == (0.2, 0.8, 2)
    assert [len(b) for b in a.batches()] == [2, 1, 2, 1, 2, 1]  # one shot and fidelity per batch


def test_misspelt_seeds_is_two_errors_not_three():
    errs = errors_of(job(shots=[{"id": "seven", "prompt": "a seven", "seed": [0]}]))
    assert len(errs) == 2, errs
    assert "field `seed`: Expected one of" in errs[0]
    assert "Did you mean `seeds`?" in errs[0]
    assert "field `seeds`: Expected it (in the shot or in `defaults`), but got nothing." in errs[1]


def test_name_pattern_fields_and_video_extension():
    data = job(shots=[{"id": "clip", "prompt": "a one", "seeds": [7], "frames": 4, "fps": 12,
                       "name": "{shot}/{index:03d}-{seed:05d}-{steps}"}])  # fmt: skip
    (out,) = parse_job(data).outputs()
    assert out.name == "clip/000-00007-25.mp4"
    assert out.kind == "mp4"
    assert (out.options.frames, out.options.fps) == (4, 12)
    fine = parse_job(job(block_map="m", shots=[{**SHOT, "fidelity": 0.125}])).outputs()[0]
    assert fine.name == "seven/f+0.125_s0.png"


def test_missing_field_names_shot_and_field():
    (err,) = errors_of(job(shots=[{"id": "seven", "seeds": [0]}]))
    assert err.startswith("shots[0] (id 'seven'), field `prompt`: Expected")
    assert "but got nothing" in err
    assert any("field `model`" in e and "got nothing" in e for e in errors_of({"shots": [SHOT]}))
    (err,) = errors_of(job(shots=[{**SHOT, "prompt": None}]))
    assert err == "shots[0] (id 'seven'), field `prompt`: Expected `prompt` to be a str, but got None."


def test_wrong_type_says_expected_and_got():
    (err,) = errors_of(job(shots=[{**SHOT, "steps": "ten"}]))
    assert err == "shots[0] (id 'seven'), field `steps`: Expected `steps` to be an int in [1, 1000], but got 'ten'."
    (err,) = errors_of(job(batch_size=0))
    assert "field `batch_size`: Expected an int in [1, 64], but got int 0" in err


def test_unknown_fields_are_errors_with_a_hint():
    errs = errors_of(job(shots=[{**SHOT, "seed": 3}], defaults={"stpes": 4}, colour="red"))
    assert len(errs) == 3
    assert any("shots[0] (id 'seven'), field `seed`" in e and "Did you mean `seeds`?" in e for e in errs)
    assert any("defaults, field `stpes`" in e and "Did you mean `steps`?" in e for e in errs)
    assert any("job, field `colour`" in e and "unknown field" in e for e in errs)


def test_all_errors_are_reported_together():
    errs = errors_of(job(shots=[{**SHOT, "guidance": -1, "fidelity": 2}, {"id": "seven", "prompt": 3, "seeds": []}]))
    assert len(errs) == 5, errs
    text = str(JobError("j.yaml", errs))
    assert text.startswith("j.yaml is not a valid job (5 error(s)); nothing was rendered:")


@pytest.mark.parametrize("pattern", ["../{seed}", "/abs/{seed}", "{shot}/../../{seed}", ".hidden/{seed}",
                                     "{shot}\\{seed}", "a//{seed}", "sp ace{seed}"])  # fmt: skip
def test_names_cannot_escape_the_output_folder(pattern: str):
    (err,) = errors_of(job(shots=[{**SHOT, "name": pattern}]))
    assert err.startswith("shots[0] (id 'seven'), field `name`: Expected a name inside the output folder")


def test_name_problem():
    assert name_problem("shot/f+0.50_s1.png") is None
    assert name_problem("../x.png")
    assert name_problem(".x.png")
    assert name_problem("/x.png")
    assert name_problem("a/")


def test_names_must_be_distinct_and_patterns_known():
    (err,) = errors_of(job(shots=[{**SHOT, "name": "{shot}"}]))
    assert "Expected a distinct name per output" in err
    assert "'seven.png'" in err
    (err,) = errors_of(job(shots=[{**SHOT, "name": "{prompt}_{seed}"}]))
    assert "unknown placeholder(s) ['prompt']" in err
    (err,) = errors_of(job(shots=[{**SHOT, "name": "{seed}.png"}]))
    assert "without extension" in err
    errs = errors_of(job(shots=[SHOT, SHOT]))
    assert any("shots[1] (id 'seven'), field `id`" in e and "shots[0] has it too" in e for e in errs)


def test_seed_and_fidelity_forms():
    bad = [({"seeds": [1, 1]}, "distinct seeds"), ({"seeds": {"start": 0}}, "{start: int, count: int}"),
           ({"seeds": [-1]}, "[0, 2**63)"), ({"fidelity": [0.5, 0.5]}, "distinct values"),
           ({"fidelity": {"from": -2, "to": 1, "count": 3}}, "sweep"), ({"window": [0.8, 0.2]}, "`stop`"),
           ({"size": [16]}, "[width, height]"), ({"fps": 8}, "only with `frames`")]  # fmt: skip
    for change, words in bad:
        (err,) = errors_of(job(block_map="m", shots=[{**SHOT, **change}]))
        assert words in err, (change, err)
    fids = [
        o.options.fidelity
        for o in parse_job(
            job(block_map="m", shots=[{**SHOT, "seeds": [0], "fidelity": {"from": -1, "to": 1, "count": 5}}])
        ).outputs()
    ]
    assert fids == [-1.0, -0.5, 0.0, 0.5, 1.0]


def test_fidelity_needs_a_block_map():
    (err,) = errors_of(job(shots=[{**SHOT, "fidelity": [0, 0.5]}]))
    assert "field `fidelity`: Expected 0 when the job has no `block_map`, but got [0.0, 0.5]" in err


def test_file_level_errors(tmp_path: Path):
    dup = tmp_path / "dup.yaml"
    dup.write_text("model: digits\nmodel: other\nshots: []\n")
    with pytest.raises(JobError, match="duplicate key 'model'"):
        load_job(dup)
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": "digits", "model": "x"}')
    with pytest.raises(JobError, match="duplicate key"):
        load_job(bad)
    with pytest.raises(JobError, match="ending in .yaml, .yml or .json"):
        load_job(tmp_path / "job.txt")
    with pytest.raises(JobError, match="readable UTF-8 job file"):
        load_job(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n")
    with pytest.raises(JobError, match="Expected a mapping"):
        load_job(tmp_path / "list.yaml")


def test_example_job_is_valid():
    example = Path(__file__).resolve().parents[1] / "assets" / "example-job.yaml"
    job_ = load_job(example)
    assert job_.model == "digits"
    assert len(job_.outputs()) > 10
    assert {o.kind for o in job_.outputs()} == {"png"}


def test_yaml_aliases_are_refused_but_merge_keys_work(tmp_path: Path):
    """An alias bomb (9**7 strings from 500 bytes) is refused before it expands; `<<: *anchor` merges."""
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 8)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\nmodel: digits\nshots: [{id: x, prompt: *a7, seeds: [1]}]\n")
    with pytest.raises(JobError, match=r"Expected no aliases \(\*name\) except as a merge key") as info:
        load_job(bomb)
    assert len(str(info.value)) < 1000
    reuse = tmp_path / "reuse.yaml"
    reuse.write_text("model: digits\nshots:\n  - &s {id: a, prompt: p, seeds: [1]}\n  - *s\n")
    with pytest.raises(JobError, match="line 3"):
        load_job(reuse)
    merged = tmp_path / "merge.yaml"
    merged.write_text(
        "model: digits\nshots:\n  - &base {id: one, prompt: a seven, seeds: [1, 2], steps: 3}\n"
        "  - <<: *base\n    id: two\n  - <<: [*base]\n    id: three\n    steps: 5\n"
    )
    outs = load_job(merged).outputs()
    assert [(o.name, o.options.steps, o.options.prompt) for o in outs[2:5]] == [
        ("two/f+0.00_s1.png", 3, "a seven"),
        ("two/f+0.00_s2.png", 3, "a seven"),
        ("three/f+0.00_s1.png", 5, "a seven"),
    ]
    dup = tmp_path / "dup.yaml"
    dup.write_text("model: digits\nshots:\n  - {id: one, prompt: a, prompt: b, seeds: [1]}\n")
    with pytest.raises(JobError, match="duplicate key 'prompt'"):
        load_job(dup)


def test_duplicate_checks_are_linear(tmp_path: Path):
    """20,000 seeds with duplicates, and 20,000 JSON keys, are checked in well under a second each (was 3-4 s)."""
    import time

    seeds = list(range(20_000)) + [5, 7]
    start = time.perf_counter()
    (err,) = errors_of(job(shots=[{**SHOT, "seeds": seeds}]))
    assert "Expected distinct seeds, but got [5, 7] more than once" in err
    big = tmp_path / "keys.json"
    big.write_text(
        json.dumps({"model": "digits", "shots": [SHOT]})[:-1]
        + "".join(f', "k{i}": {i}' for i in range(20_000))
        + ', "k3": 0}'
    )
    with pytest.raises(JobError, match=r"duplicate key\(s\) \['k3'\]"):
        load_job(big)
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize(
    "pattern, words",
    [
        ("{seed:0100000000d}", "widths and precisions of at most 240"),
        ("{seed:.999f}", "widths and precisions of at most 240"),
        ("{shot:d}", "failed: ValueError: Unknown format code 'd'"),
        ("{seed:c}_{shot}", "failed: OverflowError"),
        ("{seed:{steps}}", "no nested placeholders"),
        ("x" * 300, "at most 240 characters"),
    ],
)
def test_name_pattern_errors_name_shot_and_field(pattern: str, words: str):
    (err,) = errors_of(job(shots=[{**SHOT, "seeds": [2**40], "name": pattern}]))
    assert err.startswith("shots[0] (id 'seven'), field `name`: Expected")
    assert words in err
    assert len(err) < 600


def test_long_prompts_are_refused_up_front_and_cut_in_messages():
    long = "a seven " * 125_000  # 1 MB
    errs = errors_of(job(shots=[{**SHOT, "prompt": long, "negative_prompt": long}]))
    assert len(errs) == 2
    assert all("Expected at most 10000 characters" in e for e in errs)
    assert "(1000000 characters)" in errs[0]
    assert max(len(e) for e in errs) < 300
    assert parse_job(job(shots=[{**SHOT, "prompt": "p" * 10_000}])).shots[0].values["prompt"] == "p" * 10_000


def test_messages_do_not_build_huge_reprs():
    deep: list = []
    for _ in range(50):
        deep = [deep] * 50  # 50**50 leaves if printed in full
    errs = errors_of({"model": "digits", "shots": [{**SHOT, "seeds": deep, "window": deep}]})
    assert len(errs) == 2
    assert max(len(e) for e in errs) < 400
    errs = errors_of({"model": "digits", "shots": [{**SHOT, "id": "i" * 10**6, "k" * 10**6: 1}]})
    assert len(errs) == 2
    assert max(len(e) for e in errs) < 500
    assert "(1000000 characters)" in errs[0]


HOSTILE = [
    None,
    True,
    -1,
    0,
    2**63,
    1e999,
    float("nan"),
    "",
    "x" * 300,
    "../up",
    "{seed:0100000000d}",
    "{shot:d}",
    [],
    [1, 1],
    {},
    {"start": 0, "count": 10**7},
    {"from": 2, "to": -2, "count": 3},
    [[[]]],
    "*",
    "<<",
]
TEXT_EDITS = ["*a", "&a ", "<<: *a\n", "{", "]", "\t", "\xff", "- ", ": ", "!!python/object:os.system ", "\n  "]


def _mutate(rng, example: str, data: dict) -> str | dict:
    """One random mutation of the example job: an edit of its text, or a hostile value at a random place."""
    import copy
    import random

    assert isinstance(rng, random.Random)
    if rng.random() < 0.4:
        pos = rng.randrange(len(example))
        cut = rng.choice([0, 0, 1, 5, 40])
        return example[:pos] + rng.choice(TEXT_EDITS) + example[pos + cut :]
    data = copy.deepcopy(data)
    node = data
    for _ in range(rng.randrange(1, 4)):  # walk down a few levels
        if isinstance(node, dict) and node:
            key = rng.choice(sorted(node, key=str))
            if rng.random() < 0.5 or not isinstance(node[key], (dict, list)) or not node[key]:
                node[key if rng.random() < 0.9 else rng.choice(["colour", "id", "seed"])] = rng.choice(HOSTILE)
                break
            node = node[key]
        elif isinstance(node, list) and node:
            i = rng.randrange(len(node))
            if rng.random() < 0.5 or not isinstance(node[i], (dict, list)):
                node[i] = rng.choice(HOSTILE)
                break
            node = node[i]
    return data


def test_fuzzed_example_jobs_give_clean_errors_or_valid_jobs(tmp_path: Path):
    """200 random mutations (fixed seed) of assets/example-job.yaml: a `JobError` of "Expected ..." lines, or a
    job whose outputs are all distinct safe names; never another exception, never a huge message."""
    import random

    rng = random.Random(16)
    example = (Path(__file__).resolve().parents[1] / "assets" / "example-job.yaml").read_text()
    data = yaml.safe_load(example)
    outcomes = {"error": 0, "valid": 0}
    for k in range(200):
        mutated = _mutate(rng, example, data)
        path = tmp_path / f"job{k}.{'yaml' if isinstance(mutated, str) else 'json'}"
        if isinstance(mutated, str):
            path.write_text(mutated, encoding="utf-8", errors="surrogateescape")
        else:
            path.write_text(json.dumps(mutated))  # NaN and Infinity included, as Python's json writes them
        try:
            job_ = load_job(path)
        except JobError as err:
            outcomes["error"] += 1
            assert err.errors, err.errors
            assert all("Expected" in e or "parsing failed" in e for e in err.errors), err.errors
            assert len(str(err)) < 20_000, f"mutation {k}: a {len(str(err))}-character message"
            continue
        outcomes["valid"] += 1
        names = [o.name for o in job_.outputs()]
        assert len(set(names)) == len(names), k
        assert all(name_problem(n) is None for n in names), k
    assert outcomes["error"] > 50, outcomes
    assert outcomes["valid"] > 10, outcomes  # both kinds were exercised


def test_fidelity_mode_reaches_each_output_and_a_wrong_one_is_named():
    outs = parse_job(job(block_map="m", defaults={"fidelity_mode": "guidance"}, shots=[{**SHOT, "fidelity": 1}]))
    assert {o.options.fidelity_mode for o in outs.outputs()} == {"guidance"}
    assert parse_job(job()).outputs()[0].options.fidelity_mode is None  # the map's mode, else "cached"
    (err,) = errors_of(job(shots=[{**SHOT, "fidelity_mode": "fast"}]))
    assert "field `fidelity_mode`" in err and "'cached'" in err and "'fast'" in err
