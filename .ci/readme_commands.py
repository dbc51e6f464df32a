"""Write the README's Quick start commands (its first two fenced blocks) to DIR/cmd1.sh and
DIR/cmd2.sh, so CI runs exactly what a newcomer is told to run."""

import re
import sys
from pathlib import Path

readme, out = Path(sys.argv[1]).read_text(), Path(sys.argv[2])
heading = re.search(r"^#+ *quick ?start.*$", readme, re.I | re.M)
if heading is None:
    sys.exit("README.md has no 'Quick start' heading")
blocks = re.findall(r"^```[a-z]*\n(.*?)^```", readme[heading.end() :], re.M | re.S)
if len(blocks) < 2:
    sys.exit("README.md: fewer than two fenced command blocks under 'Quick start'")
for i, block in enumerate(blocks[:2], 1):
    (out / f"cmd{i}.sh").write_text(block)
