"""Copy committed benchmark tables into the documentation pages, between their markers.

    python benchmarks/readme_tables.py

Each ``<!-- NAME -->`` ... ``<!-- /NAME -->`` block of the page that PAGES assigns
to NAME is replaced by the files SECTIONS lists for NAME (the tables the scripts
wrote, the ``*-intro.md`` files written by hand beside them, and the commands that
made them). All result sections live in ``results/README.md`` today; moving one is
a one-line change to PAGES.

Relative links in a copied file (images) are written from that file's folder, so
each file reads correctly on its own (``](capacity.png)`` in
``results/engine/capacity-intro.md``); they are rewritten relative to the page
the file lands in (``](engine/capacity.png)`` in ``results/README.md``).
Running the script twice changes nothing the second time.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = {
    "perplexity-table": ["results/perplexity/table.md"],
    "perplexity-qwen-table": ["results/perplexity-qwen/table.md"],
    "defaults-table": ["results/defaults/compare-intro.md", "results/defaults/compare.md"],
    "hf-fidelity-table": ["results/hf-fidelity/table.md"],
    "load-table": [
        "results/load/kv-intro.md",
        "results/load/kv.md",
        "results/load/sharegpt-intro.md",
        "results/load/sharegpt.md",
        "results/load/prefix-intro.md",
        "results/load/prefix.md",
    ],
    "ruler-table": ["results/ruler/smollm2/intro.md", "results/ruler/smollm2/eval.md"],
    "ruler-chunked-table": ["results/ruler/smollm2-chunked-4k/intro.md", "results/ruler/smollm2-chunked-4k/eval.md"],
    "ruler-qwen-table": ["results/ruler/qwen/intro.md", "results/ruler/qwen/eval.md"],
    "ruler-staged-table": [
        "results/ruler/smollm2-staged-4k/intro.md",
        "results/ruler/smollm2-staged-keys-4k/intro.md",
        "results/ruler/smollm2-staged-keys-4k/eval.md",
    ],
    "needle-survival-table": [
        "results/ruler/needle-survival/intro.md",
        "results/ruler/needle-survival/smollm2-4096.md",
        "results/ruler/needle-survival/smollm2-4096-keys.md",
        "results/ruler/needle-survival/qwen-4096.md",
        "results/ruler/needle-survival/qwen-4096-keys.md",
        "results/ruler/needle-survival/smollm2-7168.md",
        "results/ruler/needle-survival/smollm2-4096-budget1024.md",
    ],
    "fidelity-table": ["results/fidelity/smollm2/intro.md", "results/fidelity/smollm2/eval.md"],
    "eval-table": ["results/eval/eval-intro.md", "results/eval/eval.md"],
    "eval-long-table": ["results/eval-long-prompts/eval-intro.md", "results/eval-long-prompts/eval.md"],
    "targets-table": ["results/load-targets/kv-intro.md", "results/load-targets/kv.md"],
    "layout-table": ["results/load-layout/kv-intro.md", "results/load-layout/kv.md"],
    "peers-table": ["results/peers/intro.md", "results/peers/side-by-side.md"],
    "peers-ruler-table": ["results/peers/ruler-openvino/intro.md", "results/peers/ruler-openvino/ruler.md"],
    "fp8-table": ["results/engine/capacity-fp8-intro.md", "results/engine/capacity-fp8.md"],
    "parallel-table": [
        "results/parallel/parallel.md",
        "results/parallel-vanilla/parallel.md",
        "results/parallel-qwen/parallel.md",
        "results/parallel-qwen-pp/parallel.md",
        "results/parallel-nodes/parallel.md",
    ],
    "engine-table": [
        "results/engine/capacity-intro.md",
        "results/engine/capacity.md",
        "results/engine/long-prompts-intro.md",
        "results/engine/long-prompts.md",
        "results/engine/long-prompts-staged-intro.md",
        "results/engine/long-prompts-staged.md",
        "results/engine/long-prompts-staged-keys.md",
        "results/engine/overhead-intro.md",
        "results/engine/overhead.md",
        "results/engine/scoring-cost-intro.md",
        "results/engine/scoring-cost.md",
        "results/engine/attend-cost-intro.md",
        "results/engine/attend-cost.md",
    ],
}
# section -> the page (relative to the repository root) that holds its markers
PAGES = {
    "perplexity-table": "results/README.md",
    "perplexity-qwen-table": "results/README.md",
    "defaults-table": "results/README.md",
    "hf-fidelity-table": "results/README.md",
    "load-table": "results/README.md",
    "ruler-table": "results/README.md",
    "ruler-chunked-table": "results/README.md",
    "ruler-qwen-table": "results/README.md",
    "ruler-staged-table": "results/README.md",
    "needle-survival-table": "results/README.md",
    "fidelity-table": "results/README.md",
    "eval-table": "results/README.md",
    "eval-long-table": "results/README.md",
    "engine-table": "results/README.md",
    "parallel-table": "results/README.md",
    "targets-table": "results/README.md",
    "layout-table": "results/README.md",
    "peers-table": "results/README.md",
    "peers-ruler-table": "results/README.md",
    "fp8-table": "results/README.md",
}
# ](target) of a Markdown link or image whose target is a relative path
# (not a URL, an anchor or an absolute path)
LINK = re.compile(r"(\]\()(?![a-zA-Z][a-zA-Z0-9+.-]*:|#|/)([^)\s]+)(\))")


def rebase_links(text: str, source: str, page: str) -> str:
    """Rewrite the relative link targets of ``text`` (from file ``source``) relative to ``page``.

    Both paths are relative to the repository root.
    """
    source_dir, page_dir = os.path.dirname(source), os.path.dirname(page) or "."

    def rebase(m: re.Match) -> str:
        target = os.path.relpath(os.path.join(source_dir, m.group(2)), page_dir)
        return m.group(1) + Path(target).as_posix() + m.group(3)

    return LINK.sub(rebase, text)


def main() -> int:
    if set(PAGES) != set(SECTIONS):
        raise SystemExit(f"PAGES and SECTIONS name different sections: {sorted(set(PAGES) ^ set(SECTIONS))}")
    for page in sorted(set(PAGES.values())):
        path = ROOT / page
        text = path.read_text()
        for name in (n for n, p in PAGES.items() if p == page):
            pattern = re.compile(rf"(<!-- {re.escape(name)} -->\n).*?(<!-- /{re.escape(name)} -->)", re.S)
            if not pattern.search(text):
                raise SystemExit(f"{page} has no <!-- {name} --> section")
            files = SECTIONS[name]
            body = "\n".join(
                rebase_links((ROOT / f).read_text().rstrip() + "\n", f, page) for f in files if (ROOT / f).exists()
            )
            text = pattern.sub(lambda m, body=body: m.group(1) + body + m.group(2), text)
        path.write_text(text)
        print(f"updated {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
