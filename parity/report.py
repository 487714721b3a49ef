"""`python -m ms_rm_parity.report REPORT.json`: a parity report as a markdown table (worst max relative
error per stage group, over the modes the report holds), as the README quotes it."""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def worst_by_case(reports):
    table = defaultdict(lambda: defaultdict(float))
    for report in reports:
        row = table[(report["case"], report["dtype"])]
        for stage in report["stages"]:
            name = stage["stage"]
            group = "visual taps" if name.startswith("visual_tap") else "text taps" if name.startswith("text_tap") \
                else name
            row[group] = max(row[group], stage["max_rel"])
        row["modes"] = row.get("modes", 0) + 1
    return table


def markdown(reports) -> str:
    columns = ["temb", "visual taps", "text taps", "raw", "reward", "ensemble_reward"]
    lines = ["| case | dtype | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for (case, dtype), row in worst_by_case(reports).items():
        cells = [f"{row[c]:.1e}" if c in row else "" for c in columns]
        lines.append(f"| {case} | {dtype} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m ms_rm_parity.report REPORT.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        print(markdown(json.load(f)["reports"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
