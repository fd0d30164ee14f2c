"""Summarise an Autobahn|Testsuite fuzzingclient report (index.json) per section.

Usage: summarize.py REPORT_DIR AGENT [--markdown FILE] [--title TEXT] [--problems] [--breakdown SECTION]
       summarize.py REPORT_DIR AGENT --compare OTHER_REPORT_DIR OTHER_AGENT

Prints a Markdown table (one row per top-level section, plus a total) and, with --problems, the
cases that are not a clean pass, with the suite's own description and expectation so the reader
does not have to open the HTML report.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

BEHAVIORS = ("OK", "NON-STRICT", "INFORMATIONAL", "FAILED", "UNIMPLEMENTED")
# A close counts as clean only when the suite is satisfied with the closing handshake; anything
# else (FAILED, WRONG CODE, UNCLEAN, ...) means the TCP connection or the close frame misbehaved.
CLEAN_CLOSE = ("OK", "INFORMATIONAL")


def case_key(case_id: str) -> tuple[int, ...]:
    """Sort "9.10.2" after "9.2.1" (numeric, not lexical)."""
    return tuple(int(part) for part in case_id.split("."))


def load_agent(report_dir: Path, agent: str) -> dict[str, dict]:
    index = json.loads((report_dir / "index.json").read_text())
    if agent not in index:
        raise SystemExit(f"agent {agent!r} not in {report_dir / 'index.json'} (has: {sorted(index)})")
    return index[agent]


def _empty_row() -> dict:
    return {"cases": 0, "unclean": 0, "ms": 0, **dict.fromkeys(BEHAVIORS, 0)}


def section_rows(cases: dict[str, dict], depth: int = 1) -> list[dict]:
    """Aggregate per section: depth 1 groups "9.3.1" under "9", depth 2 under "9.3"."""
    rows: dict[str, dict] = defaultdict(_empty_row)
    for case_id, res in cases.items():
        row = rows[".".join(case_id.split(".")[:depth])]
        row["cases"] += 1
        behavior = res.get("behavior", "?")
        row[behavior] = row.get(behavior, 0) + 1
        if res.get("behaviorClose") not in CLEAN_CLOSE:
            row["unclean"] += 1
        row["ms"] += int(res.get("duration") or 0)
    ordered = []
    for section in sorted(rows, key=case_key):
        ordered.append({"section": section, **rows[section]})
    return ordered


def render_table(rows: list[dict]) -> str:
    columns = ["section", "cases", *BEHAVIORS, "UNCLEAN", "time (s)"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---:|" * len(columns)]
    for row in rows:
        lines.append(_row_line(row))
    lines.append(_row_line({"section": "**total**", **_sum_rows(rows)}))
    return "\n".join(lines)


def _row_line(row: dict) -> str:
    cells = [str(row["section"]), str(row["cases"])]
    cells += [str(row.get(b, 0)) for b in BEHAVIORS]
    cells += [str(row["unclean"]), f"{row['ms'] / 1000:.2f}"]
    return "| " + " | ".join(cells) + " |"


def render_comparison(a_name: str, a_cases: dict[str, dict], b_name: str, b_cases: dict[str, dict]) -> str:
    """Side-by-side per-section table; each outcome cell is OK/NON-STRICT/INFORMATIONAL/FAILED/
    UNIMPLEMENTED/UNCLEAN so the two servers fit on one line."""
    a_rows = {r["section"]: r for r in section_rows(a_cases)}
    b_rows = {r["section"]: r for r in section_rows(b_cases)}
    columns = [
        "section",
        "cases",
        f"{a_name} OK/NS/INFO/FAIL/UNIMPL/UNCLEAN",
        f"{b_name} OK/NS/INFO/FAIL/UNIMPL/UNCLEAN",
        f"{a_name} time (s)",
        f"{b_name} time (s)",
        f"ratio {a_name}/{b_name}",
    ]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---:|" * len(columns)]
    empty = _empty_row()
    totals = {"**total**": (_sum_rows(a_rows.values()), _sum_rows(b_rows.values()))}
    pairs = {s: (a_rows.get(s, empty), b_rows.get(s, empty)) for s in sorted(set(a_rows) | set(b_rows), key=case_key)}
    for section, (a, b) in {**pairs, **totals}.items():
        cases = str(a["cases"]) if a["cases"] == b["cases"] else f"{a['cases']} / {b['cases']}"
        ratio = f"{a['ms'] / b['ms']:.2f}" if b["ms"] else "-"
        cells = [
            section,
            cases,
            _outcomes(a),
            _outcomes(b),
            f"{a['ms'] / 1000:.2f}",
            f"{b['ms'] / 1000:.2f}",
            ratio,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _sum_rows(rows: Iterable[dict]) -> dict:
    total = _empty_row()
    for row in rows:
        for key in total:
            total[key] += row.get(key, 0)
    return total


def _outcomes(row: dict) -> str:
    return "/".join(str(row.get(key, 0)) for key in (*BEHAVIORS, "unclean"))


def problem_cases(report_dir: Path, cases: dict[str, dict]) -> list[str]:
    out = []
    for case_id in sorted(cases, key=case_key):
        res = cases[case_id]
        if res.get("behavior") in ("OK", "INFORMATIONAL") and res.get("behaviorClose") in CLEAN_CLOSE:
            continue
        detail: dict = {}
        report_file = res.get("reportfile")
        if report_file and (report_dir / report_file).exists():
            detail = json.loads((report_dir / report_file).read_text())
        out.append(
            f"- **{case_id}** behavior={res.get('behavior')} close={res.get('behaviorClose')} "
            f"remoteCloseCode={res.get('remoteCloseCode')}\n"
            f"  - description: {_one_line(detail.get('description', '?'))}\n"
            f"  - expectation: {_one_line(detail.get('expectation', '?'))}\n"
            f"  - result: {_one_line(detail.get('result', '?'))}\n"
            f"  - resultClose: {_one_line(detail.get('resultClose', '?'))}\n"
            f"  - events expected: {_clip(detail.get('expected'))}; received: {_clip(detail.get('received'))}"
        )
    return out


def _clip(value: object, limit: int = 160) -> str:
    """Section 9 payloads are megabytes; the shape of the events is what matters."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report_dir", type=Path)
    parser.add_argument("agent")
    parser.add_argument("--markdown", type=Path, help="also write the table (and problems) to this file")
    parser.add_argument("--title", default=None)
    parser.add_argument("--problems", action="store_true", help="list cases that are not a clean pass")
    parser.add_argument(
        "--compare",
        nargs=2,
        metavar=("REPORT_DIR", "AGENT"),
        help="print a side-by-side table with this run only",
    )
    parser.add_argument(
        "--breakdown",
        metavar="SECTION",
        action="append",
        default=[],
        help="also tabulate SECTION's subsections",
    )
    args = parser.parse_args(argv)

    cases = load_agent(args.report_dir, args.agent)
    if args.compare:
        other_dir, other_agent = Path(args.compare[0]), args.compare[1]
        other = load_agent(other_dir, other_agent)
        sys.stdout.write(render_comparison(args.agent, cases, other_agent, other) + "\n")
        return 0
    parts = []
    if args.title:
        parts.append(args.title)
    parts.append(render_table(section_rows(cases)))
    for section in args.breakdown:
        subset = {k: v for k, v in cases.items() if k.split(".")[0] == section}
        if subset:
            parts.append(f"Section {section} by subsection:")
            parts.append(render_table(section_rows(subset, depth=2)))
    problems = problem_cases(args.report_dir, cases) if args.problems else []
    if args.problems:
        parts.append(f"Cases that are not a clean pass: {len(problems)}" + (":" if problems else "."))
        if problems:
            parts.append("\n".join(problems))
    text = "\n\n".join(parts) + "\n"
    sys.stdout.write(text)
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
