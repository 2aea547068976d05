"""Fail unless the demo log's before/after summary shows DPO working (issue: the demo)."""

import re
import sys

log = open(sys.argv[1]).read()


def pair(label: str) -> tuple[float, float]:
    m = re.search(re.escape(label) + r"[^\n]*?([\d.]+|n/a)%?\s*->\s*([\d.]+)%", log)
    if not m:
        sys.exit(f"check_demo: no '{label}' line in the demo summary")
    before = float("nan") if m.group(1) == "n/a" else float(m.group(1))
    return before, float(m.group(2))


_, reward_after = pair("DPO reward accuracy")
share_before, share_after = pair("sampled answers with the preferred behaviour")
print(
    f"check_demo: reward accuracy after {reward_after}%, preferred share {share_before}% -> {share_after}%"
)
if reward_after < 90 or share_after < share_before + 20:
    sys.exit("check_demo: the demo did not show the expected improvement")
