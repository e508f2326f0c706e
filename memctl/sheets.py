"""Contact sheets of a render: for each shot of images, its seeds (rows) by fidelities (columns), from the files.

>>> SHEET_MAX  # seeds, fidelities
(32, 16)
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

from PIL import Image

from memctl.atomic import atomic_write
from memctl.grid import make_grid
from memctl.jobs import Job
from memctl.options import short_repr

SHEET_CELL = 128  # contact sheet tiles: smaller images enlarged to a whole multiple of their size at least this big
SHEET_MAX = (32, 16)  # at most this many seeds (rows) and fidelities (columns) per sheet


def write_contact_sheets(out: Path, job: Job) -> list[Path]:
    """`out/SHOT.contact.png` for each shot of images: its seeds (rows) by fidelities (columns, -1 first), enlarged
    and labelled; outputs not on disk stay empty. A sheet is rewritten only when its bytes change."""
    names, by_shot = set(), {}
    for o in job.outputs():
        names.add(o.name)
        if o.kind == "png":
            by_shot.setdefault(o.shot, {})[(o.options.seed, o.options.fidelity)] = out / o.name
    written = []
    for shot in job.shots:
        cells = {k: p for k, p in by_shot.get(shot.id, {}).items() if p.is_file()}
        path = out / f"{shot.id}.contact.png"
        if not cells or path.name in names:  # nothing to show, or an output has this name
            continue
        buf = io.BytesIO()
        contact_sheet(shot, cells).save(buf, format="PNG")
        if not (path.is_file() and path.read_bytes() == buf.getvalue()):
            try:
                atomic_write(path, buf.getvalue())
            except OSError as err:  # a sheet is a view of the outputs: its failure does not fail the render
                print(f"memctl render: contact sheet {path} not written: {err.strerror or err}", file=sys.stderr)
                continue
        written.append(path)
    return written


def contact_sheet(shot, cells: dict[tuple[int, float], Path]):
    """One shot's sheet (a PIL image) from `{(seed, fidelity): png path}`; at most `SHEET_MAX` seeds x fidelities."""
    seeds, fids = list(shot.values["seeds"]), sorted(set(shot.values["fidelity"]))
    rows, cols = seeds[: SHEET_MAX[0]], fids[: SHEET_MAX[1]]
    images = {k: _open_rgb(p) for k, p in cells.items() if k[0] in rows and k[1] in cols}
    side = max((max(im.size) for im in images.values()), default=SHEET_CELL)
    cell = side * -(-SHEET_CELL // side) if side < SHEET_CELL else min(side, 2 * SHEET_CELL)  # whole multiples
    title = f"{shot.id}: {short_repr(shot.values['prompt'], 80)} - fidelity -1 new ... +1 faithful"
    if (len(rows), len(cols)) != (len(seeds), len(fids)):
        title += f" (first {len(rows)} of {len(seeds)} seeds, {len(cols)} of {len(fids)} fidelities)"
    grid = [(f"seed {s}", [images.get((s, f)) for f in cols]) for s in rows]
    header = [f"fidelity {f + 0.0:+g}" for f in cols]  # + 0.0: no "-0"
    return make_grid(grid, title=title, header=header, cell=cell, label_width=110)


def _open_rgb(path: Path):
    with Image.open(path) as image:
        return image.convert("RGB")
