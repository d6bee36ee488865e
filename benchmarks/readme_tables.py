"""Copy committed benchmark tables into README.md between their markers.

    python benchmarks/readme_tables.py

Each ``<!-- NAME -->`` ... ``<!-- /NAME -->`` block is replaced by the files listed
for NAME below (the tables the scripts wrote, with the commands that made them).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = {
    "perplexity-table": ["results/perplexity/table.md"],
    "hf-fidelity-table": ["results/hf-fidelity/table.md"],
    "load-table": ["results/load/kv-intro.md", "results/load/kv.md", "results/load/sharegpt-intro.md",
                   "results/load/sharegpt.md"],
    "eval-table": ["results/eval/eval-intro.md", "results/eval/eval.md"],
    "engine-table": ["results/engine/capacity-intro.md", "results/engine/capacity.md",
                     "results/engine/overhead-intro.md", "results/engine/overhead.md"],
}


def main() -> int:
    readme = ROOT / "README.md"
    text = readme.read_text()
    for name, files in SECTIONS.items():
        pattern = re.compile(rf"(<!-- {re.escape(name)} -->\n).*?(<!-- /{re.escape(name)} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"README.md has no <!-- {name} --> section")
        body = "\n".join((ROOT / f).read_text().rstrip() + "\n" for f in files if (ROOT / f).exists())
        text = pattern.sub(lambda m: m.group(1) + body + m.group(2), text)
    readme.write_text(text)
    print(f"updated {readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
