"""README_zh.md keeps step with README.md: the same sections (every heading translated, at the
same level, in the same order) and, section by section, the same commands in the code blocks.

README_zh.md names the English heading each of its headings translates on the line above it,
`<!-- en: Training -->` (a heading kept as it is, `# tinyllama`, needs none), so a section added to, renamed in or removed from one README and not
the other is reported by name and line. Commands are the lines of ```bash and ```python
blocks with their `#` comments removed (the comments are translated, the code is not).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

REPO = Path(__file__).resolve().parents[1]
CODE_LANGUAGES = ("bash", "sh", "python")
EN_MARK = re.compile(r"<!--\s*en:\s*(.*?)\s*-->$")


@dataclass
class Section:
    level: int  # 1 for "#", 2 for "##", ...; 0 for the text before the first heading
    title: str
    line: int
    en: Optional[str] = None  # README_zh.md: the README.md heading this one translates
    commands: List[str] = field(default_factory=list)

    def show(self) -> str:
        return (
            f"'{'#' * self.level} {self.title}' (line {self.line})"
            if self.level
            else "the top (before any heading)"
        )


def _command(line: str) -> str:
    """A code line without its comment and with runs of spaces collapsed."""
    return " ".join(re.sub(r"(^|\s)#.*$", "", line).split())


def parse(text: str) -> List[Section]:
    sections = [Section(0, "", 1, en="")]
    fence: Optional[str] = None  # language of the open code block
    pending_en: Optional[str] = None
    continued = ""
    for no, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fence = None if fence is not None else line.strip()[3:].strip()
            continue
        if fence is not None:
            if fence in CODE_LANGUAGES:
                cmd = _command(continued + line)
                continued = cmd[:-1] + " " if cmd.endswith("\\") else ""
                if cmd and not continued:
                    sections[-1].commands.append(cmd)
            continue
        mark = EN_MARK.match(line.strip())
        if mark:
            pending_en = mark.group(1)
            continue
        heading = re.match(r"(#{1,6})\s+(.*?)\s*$", line)
        if heading:
            sections.append(Section(len(heading.group(1)), heading.group(2), no, en=pending_en))
        if line.strip():
            pending_en = None  # a mark belongs to the heading right below it
    return sections


def sync_problems(
    en_text: str, zh_text: str, en_name: str = "README.md", zh_name: str = "README_zh.md"
) -> List[str]:
    """Everything that differs between the two READMEs' structure and commands, one line each."""
    en, zh = parse(en_text), parse(zh_text)
    titles = {e.title for e in en}
    for z in zh:
        if z.en is None and z.title in titles:  # kept as it is (a name), needs no mark
            z.en = z.title
    problems = [
        f"{zh_name}: heading {z.show()} has no `<!-- en: ... -->` line right above it naming "
        f"the {en_name} heading it translates"
        for z in zh
        if z.en is None
    ]
    zh = [z for z in zh if z.en is not None]
    matcher = difflib.SequenceMatcher(None, [e.title for e in en], [z.en for z in zh], autojunk=False)
    for op, e0, e1, z0, z1 in matcher.get_opcodes():
        if op == "equal":
            for e, z in zip(en[e0:e1], zh[z0:z1]):
                problems += _compare_section(e, z, en_name, zh_name)
            continue
        for e in en[e0:e1]:
            after = f", after the translation of {en[e0 - 1].show()}" if e0 > 1 else ", at the top"
            problems.append(
                f"{en_name} heading {e.show()} is missing from {zh_name}: translate that section "
                f"and put `<!-- en: {e.title} -->` above its heading{after}"
            )
        for z in zh[z0:z1]:
            problems.append(
                f"{zh_name} heading {z.show()} says it translates '{z.en}', which is not a "
                f"{en_name} heading at this place (renamed, moved or removed there?)"
            )
    return problems


def _compare_section(e: Section, z: Section, en_name: str, zh_name: str) -> List[str]:
    where = f"section {e.show()} of {en_name} ({z.show()} in {zh_name})"
    problems = []
    if e.level != z.level:
        problems.append(f"{where}: heading level {e.level} in {en_name}, {z.level} in {zh_name}")
    missing = [c for c in e.commands if c not in z.commands]
    extra = [c for c in z.commands if c not in e.commands]
    problems += [f"{where}: {zh_name} lacks the command `{c}`" for c in missing]
    problems += [f"{where}: {zh_name} has the command `{c}`, which {en_name} lacks" for c in extra]
    if not missing and not extra and e.commands != z.commands:
        problems.append(f"{where}: the commands are in another order in {zh_name}")
    return problems


def test_readme_zh_has_every_section_and_command_of_readme():
    problems = sync_problems(
        (REPO / "README.md").read_text(encoding="utf-8"), (REPO / "README_zh.md").read_text(encoding="utf-8")
    )
    assert not problems, "README.md and README_zh.md differ:\n  " + "\n  ".join(problems)


EN = """# tool

## Install

```bash
pip install tool   # the package
tool --help
```

## Use

```python
run(x)  # go
```
"""

ZH = """# tool

<!-- en: Install -->
## 安装

```bash
pip install tool   # 安装包
tool --help
```

<!-- en: Use -->
## 使用

```python
run(x)  # 运行
```
"""


def test_the_check_accepts_a_faithful_translation_and_names_what_is_missing():
    assert sync_problems(EN, ZH) == []
    # A section added to the English README only (as other work will do).
    added = EN + "\n## Export\n\n```bash\ntool export \\\n    --out dir\n```\n"
    assert sync_problems(added, ZH) == [
        "README.md heading '## Export' (line 16) is missing from README_zh.md: translate that section and "
        "put `<!-- en: Export -->` above its heading, after the translation of '## Use' (line 10)"
    ]
    # A command changed in one README only; a heading without its mark; a level changed.
    changed = ZH.replace("tool --help", "tool -h").replace("<!-- en: Use -->\n", "")
    problems = sync_problems(EN, changed.replace("## 安装", "### 安装"))
    assert any("lacks the command `tool --help`" in p and "'## Install' (line 3)" in p for p in problems)
    assert any("has the command `tool -h`, which README.md lacks" in p for p in problems)
    assert any("'## 使用' (line 11) has no `<!-- en: ... -->`" in p for p in problems)
    assert any("heading level 2 in README.md, 3 in README_zh.md" in p for p in problems)
    assert any("'## Use' (line 10) is missing" in p for p in problems)


def test_comments_and_continuations_do_not_count_as_commands():
    sections = parse(
        "## A\n\n```bash\n# only a comment\npython x.py a=1 \\\n    b=2   # both\n```\n"
        "```\nlayout   free text # not code\n```\n"
    )
    assert sections[1].commands == ["python x.py a=1 b=2"]
