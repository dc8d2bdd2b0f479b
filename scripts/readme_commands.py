"""Print the commands of one fenced block of README.md, the one right after its `<!-- ci: NAME -->` line.

.ci/run runs the README's own set-up blocks through this, so that what CI installs and what a newcomer types cannot
drift apart:  python scripts/readme_commands.py setup  |  python scripts/readme_commands.py optional
"""

import os
import sys

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def readme_block(name, path=README):
    """The lines of the ```bash block that follows `<!-- ci: name -->` (blank lines dropped); exits if there is none."""
    lines = open(path, encoding="utf-8").read().splitlines()
    tag = f"<!-- ci: {name} -->"
    if tag not in lines:
        sys.exit(f"error: {path} has no `{tag}` line (the README block that .ci/run runs)")
    rest = lines[lines.index(tag) + 1 :]
    if not rest or rest[0].strip() != "```bash" or "```" not in [line.strip() for line in rest[1:]]:
        sys.exit(f"error: `{tag}` in {path} must be followed by a ```bash ... ``` block")
    body = rest[1 : 1 + [line.strip() for line in rest[1:]].index("```")]
    return [line for line in body if line.strip()]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/readme_commands.py BLOCK_NAME")
    print("\n".join(readme_block(sys.argv[1])))
