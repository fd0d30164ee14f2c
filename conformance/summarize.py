"""Summarise an Autobahn|Testsuite fuzzingclient report (index.json) per section.

Usage: summarize.py REPORT_DIR AGENT [--markdown FILE] [--title TEXT] [--problems]

Prints a Markdown table (one row per top-level section, plus a total) and, with --problems, the
cases that are not a clean pass, with the suite's own description and expectation so the reader
does not have to open the HTML report.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
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


def section_rows(cases: dict[str, dict]) -> list[dict]:
    rows: dict[str, dict] = defaultdict(_empty_row)
    for case_id, res in cases.items():
        row = rows[case_id.split(".")[0]]
        row["cases"] += 1
        behavior = res.get("behavior", "?")
        row[behavior] = row.get(behavior, 0) + 1
        if res.get("behaviorClose") not in CLEAN_CLOSE:
            row["unclean"] += 1
        row["ms"] += int(res.get("duration") or 0)
    ordered = []
    for section in sorted(rows, key=int):
        ordered.append({"section": section, **rows[section]})
    return ordered


def render_table(rows: list[dict]) -> str:
    columns = ["section", "cases", *BEHAVIORS, "UNCLEAN", "time (s)"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---:|" * len(columns)]
    total = {"section": "**total**", **_empty_row()}
    for row in rows:
        lines.append(_row_line(row))
        for key in ("cases", "unclean", "ms", *BEHAVIORS):
            total[key] += row.get(key, 0)
    lines.append(_row_line(total))
    return "\n".join(lines)


def _row_line(row: dict) -> str:
    cells = [str(row["section"]), str(row["cases"])]
    cells += [str(row.get(b, 0)) for b in BEHAVIORS]
    cells += [str(row["unclean"]), f"{row['ms'] / 1000:.2f}"]
    return "| " + " | ".join(cells) + " |"


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
            f"  - resultClose: {_one_line(detail.get('resultClose', '?'))}"
        )
    return out


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report_dir", type=Path)
    parser.add_argument("agent")
    parser.add_argument("--markdown", type=Path, help="also write the table (and problems) to this file")
    parser.add_argument("--title", default=None)
    parser.add_argument("--problems", action="store_true", help="list cases that are not a clean pass")
    args = parser.parse_args(argv)

    cases = load_agent(args.report_dir, args.agent)
    parts = []
    if args.title:
        parts.append(args.title)
    parts.append(render_table(section_rows(cases)))
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
