"""Print the shell commands of one README section's bash blocks (for .ci/run to execute)."""

import re
import sys

readme, title = open(sys.argv[1]).read(), sys.argv[2]
section = re.split(r"^## ", readme, flags=re.M)
(body,) = [s for s in section if s.startswith(title)]
for block in re.findall(r"```bash\n(.*?)```", body, flags=re.S):
    for line in block.replace("\\\n", " ").splitlines():
        command = line.split("  #")[0].strip()
        if command:
            print(command)
