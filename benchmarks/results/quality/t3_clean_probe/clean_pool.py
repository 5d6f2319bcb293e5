"""Session 18 dev probe (tags s18-t3-clean, s18-t3-clean-sf0.5): the tweet t3 pool with its meta text stripped.

usage: python clean_pool.py POOL.jsonl OUT.jsonl
POOL is the benchmark's cached tweet pool (<work>/pools/t3-<hash>.jsonl, 4,096 rows). Strips an opening
"Rewrite:", "Rewritten text:", "Tweet:", "Text:", "Sentiment:", "Here's ...:" (and the like), hashtags that
mention rewriting and surrounding quotes; drops rows left empty or still talking about rewriting (on the
session-16 pool: 329 rows changed, 193 dropped, 3,903 kept). Teacher labels are cleared, so t3 recomputes
them on the new text. Then:
    python benchmarks/quality.py --tasks tweets --methods t3 --seeds 0 1 --threads 1 --work W \
        --dev s18-t3-clean-sf0.5 -O t3.source_fraction=0.5 -O t3.pool_file=OUT.jsonl
"""

import json
import re
import sys

PREFIX = re.compile(
    r"^\s*(rewrite[a-z\- ]*|rewritten( text| tweet)?|tweet|text|sentiment|original( text)?|here'?s[^:]*|sender"
    r"|output|answer)\s*[:\-]\s*",
    re.I,
)
TAG = re.compile(r"#\w*rewrit\w*", re.I)


def main(src: str, dst: str) -> None:
    rows = [json.loads(line) for line in open(src, encoding="utf-8")]
    out, changed, dropped = [], 0, 0
    for r in rows:
        text = TAG.sub("", PREFIX.sub("", r["text"])).strip().strip('"').strip()
        if not text or re.search(r"rewrit|rephras", text, re.I):
            dropped += 1
            continue
        changed += text != r["text"]
        row = {**r, "text": text, "label": None}
        row.pop("teacher_confidence", None)
        out.append(row)
    with open(dst, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in out))
    print(f"{len(rows)} rows: {changed} changed, {dropped} dropped, {len(out)} kept")


if __name__ == "__main__":
    main(*sys.argv[1:3])
