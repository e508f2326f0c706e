"""Add rows of some effect-plan families to the per-model records of `memctl bench effect` and rebuild its tables.

    python bench/effect_add_rows.py "memctl map in-attention" digits-s0 digits-s1 digits-attr-s0 digits-attr-s1
    python bench/effect_add_rows.py --remeasure "memctl map baked,wen,ren,jain,nemo" moving-digits

Each model's record (`bench/results/effect/MODEL.json`) gets the family's rows measured now by `memctl.effect.add_rows`
(same probe set, map and seeds as the record; the plain row is re-sampled and must match), then `effect.json` and
`effect.md` are rebuilt from all records by the bench's own table code (the md keeps its header, and says which rows
were added by which command).

`--replace` (video testbeds): the family's rows already in the record are measured again (image records always are),
e.g. after a change of the code that makes them.

`--remeasure` (video testbeds): every row of the record is measured again, not only the family's, so that measures
added to `memctl.evaluate` since the record was made (e.g. `nearest_bound`) reach every row; the record's rows are
replaced and the table's earlier "added rows" lines for those models are dropped.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from memctl.bench import _effect_md, _write_json, effect_commands, effect_summary
from memctl.effect import add_rows
from memctl.effect_video import CPU_ROWS, effect_for_video, is_video

OUT = Path(__file__).parent / "results"


def main(family: str, models: list[str], remeasure: bool = False, replace: bool = False) -> None:
    """`family`: one row family, or several separated by commas ("wen,ren,jain,nemo")."""
    torch.set_num_threads(1)
    families = tuple(f.strip() for f in family.split(","))
    if remeasure and not all(is_video(name) for name in models):
        raise SystemExit(f"Expected video testbeds with --remeasure (image rows re-measure by family), got {models}.")
    for name in models:
        path = OUT / "effect" / f"{name}.json"
        if is_video(name):  # resume the video bench from its record with the family added (rows kept as measured)
            partial = path.with_suffix(".partial.json")
            if not partial.is_file():  # else: a run that stopped left its rows there, and this one resumes them
                old = json.loads(path.read_text())
                if remeasure:  # only the plain row, which the run re-samples and checks
                    old = {**old, "rows": {"plain": old["rows"]["plain"]}}
                elif replace:  # without the family's rows, which the run then measures
                    old = {**old, "rows": {k: v for k, v in old["rows"].items() if k not in families}}
                partial.write_text(json.dumps(old, indent=1) + "\n")
            before = json.loads(path.read_text())
            record = effect_for_video(name, seeds=before["eval"]["seeds"], families=(*CPU_ROWS, *families),
                                      partial=partial, noise=before["eval"].get("noise", "shared"))  # fmt: skip
            partial.unlink()
            record = {k: before[k] for k in ("seeds_per_prompt", "versions", "command") if k in before} | record
            if not remeasure:  # the commands that added the rows kept from the record
                record["added_rows"] = {**before.get("added_rows", {}), **record.get("added_rows", {})}
        else:
            record = add_rows(json.loads(path.read_text()), name, families)
        added = record.setdefault("added_rows", {})
        flag = "--remeasure " if remeasure else "--replace " if replace else ""
        added[family] = f"python bench/effect_add_rows.py {flag}" + (
            f"{json.dumps(family, ensure_ascii=False)} {name}"
        )
        _write_json(path, record)
        print(name, json.dumps({k: v for k, v in record["bars"].items() if k.endswith("_checks")}), flush=True)
    quoted = json.dumps(family, ensure_ascii=False)
    flag = "--remeasure " if remeasure else "--replace " if replace else ""
    note = f"- added rows `{family}`: `python bench/effect_add_rows.py {flag}{quoted} {' '.join(models)}`\n"
    rebuild_tables(note, tuple(f" {name}`\n" for name in models) if remeasure else ())


def rebar(models: list[str]) -> None:
    """The bars of each model's record computed again from its stored rows (no sampling; after `memctl.effect.bars`
    gains checks), and the tables rebuilt."""
    from memctl.effect import bars
    from memctl.zoo import load_testbed

    for name in models:
        path = OUT / "effect" / f"{name}.json"
        record = json.loads(path.read_text())
        record["bars"] = bars(load_testbed(name), record["rows"], record["eval"]["seeds"])
        _write_json(path, record)
    rebuild_tables(
        f"- bars computed again from the stored rows: `python bench/effect_add_rows.py --rebar {' '.join(models)}`\n"
    )


def rebuild_tables(note: str, stale: tuple[str, ...] = ()) -> None:
    """effect.json and effect.md from every record; `note` joins the md's header (in place of an equal line), and
    earlier "added rows" lines ending in one of `stale` leave it."""
    results = {p.stem: json.loads(p.read_text()) for p in sorted((OUT / "effect").glob("*.json"))}
    report = json.loads((OUT / "effect.json").read_text())
    report["models"] = results
    _write_json(OUT / "effect.json", report)
    lines = (OUT / "effect.md").read_text().splitlines(keepends=True)
    head = lines[: lines.index("\n")]  # the title, one line per model's command, notes, up to the first blank line
    notes = [line for line in head if line.startswith("- ") and not line.startswith(tuple(f"- {m}:" for m in results))]
    notes = [line for line in notes if line != note and not (line.startswith("- added rows") and line.endswith(stale))]
    head = [lines[0], *effect_commands(results), *notes, note]
    md = [*head, "\nSummary: most-exposed canaries copied / canary novel-valid (attribute-correct on digits-attr) / "
          "compositional (digits-attr) / ordinary valid (denoiser evaluations per image).\n\n",
          effect_summary(results), *_effect_md(results)]  # fmt: skip
    (OUT / "effect.md").write_text("".join(md))


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--rebar"]:
        sys.exit(rebar(args[1:]) if args[1:] else "usage: python bench/effect_add_rows.py --rebar MODEL...")
    remeasure, replace = "--remeasure" in args, "--replace" in args
    args = [a for a in args if a not in ("--remeasure", "--replace")]
    if len(args) < 2:
        sys.exit(
            f"usage: python bench/effect_add_rows.py [--remeasure|--replace] FAMILIES MODEL..., but got {sys.argv[1:]}"
        )
    main(args[0], args[1:], remeasure, replace)
