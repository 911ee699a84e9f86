"""The README's figures are the ones the commands wrote (issue 31: its student rows and its speed line had
drifted from `docs/results/toyworld-tables.md` and the committed bench JSON)."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def table_iou(page: str, row: str) -> str:
    """The IoU cell (the third column) of a row of the tables page."""
    for line in page.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == row:
            return cells[2]
    raise AssertionError(f"no row {row!r} in the tables page")


def test_the_readme_student_and_baseline_rows_are_the_tables_pages():
    page = (ROOT / "docs/results/toyworld-tables.md").read_text()
    readme = (ROOT / "README.md").read_text()
    pairs = {
        "GrabCut, IoU (two concepts, `make tables`)": "GrabCut",
        "student supervised on ground truth, IoU (two concepts, 3 seeds)": "supervised student (GT masks)",
        "student on D_s, IoU (two concepts, 3 seeds)": "student on D_s",
        "one student for both concepts on D_s, IoU (3 seeds)": "one student for all concepts on D_s (ours)",
        "student on D_s u D'_s, IoU (two concepts, 3 seeds)": "student on D_s u D'_s",
    }
    for readme_row, page_row in pairs.items():
        assert f"| {readme_row} | {table_iou(page, page_row)} |" in readme, readme_row
    paper, snapped = table_iou(page, "refined M"), table_iou(page, "refined M, edges snapped (ours, default)")
    assert (
        f"refined masks of the same images ({paper}); against the edge-snapped masks they learn from "
        f"({snapped})" in " ".join(readme.split())
    )


def test_the_readme_speed_line_is_the_committed_bench():
    r = json.loads((ROOT / "docs/results/bench/cpu/toyworld-fp32-b1-steps50.json").read_text())
    readme = " ".join((ROOT / "README.md").read_text().split())
    m = re.search(
        r"triplet costs (\d+\.\d+)x a plain generation on toyworld at the paper's 50 \+ 50 steps", readme
    )
    assert m and r["settings"]["steps"] == 50 and float(m.group(1)) == round(r["triplet_over_plain"], 2)
