"""README.md and docs/ against the repository: the README is short and links every page, every
link lands on a file (and heading) that exists, every command names scripts, config files,
subcommands, options, settings and test markers that exist, and the course's count of the
training loop's lines is the loop's."""

import configparser
import os
import re
import shlex

import pytest

from helpers import ROOT

PAGES = ["README.md"] + sorted(f"docs/{f}" for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md"))


def read(path):
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def slug(heading):
    """The anchor GitHub gives a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def commands(path):
    """Every `python ...` / `torchrun ...` command of a page: the lines of its bash blocks (comments
    dropped, continuations joined) and its inline code, each split at `&&`."""
    page = read(path)
    found = []
    for block in re.findall(r"```bash\n(.*?)```", page, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            found.append(line.split("  #")[0].strip())
    found += re.findall(r"`((?:python|torchrun) [^`]+)`", page.replace("\n", " "))
    return [part.strip() for line in found for part in line.split("&&")
            if part.strip().startswith(("python ", "torchrun "))]


def test_the_readme_is_short_and_links_every_page():
    readme = read("README.md")
    assert len(readme.encode()) <= 10_000
    assert len(PAGES) >= 5  # course, checkpoints, clusters, performance
    for page in PAGES[1:]:
        assert f"]({page})" in readme, page


@pytest.mark.parametrize("page", PAGES)
def test_every_link_lands(page):
    links = re.findall(r"\]\(([^)\s]+)\)", read(page))
    for target in links:
        if target.startswith(("http://", "https://")):
            continue
        file, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), file)) if file else os.path.join(ROOT, page)
        assert os.path.exists(full), f"{page}: {target}"
        if anchor:
            with open(full) as f:
                headings = {slug(h) for h in re.findall(r"^#+ (.+)$", f.read(), re.M)}
            assert anchor in headings, f"{page}: {target}"


def settings():
    import configurator
    return set(configurator.sections(os.path.join(ROOT, "train.py")))


def markers():
    ini = configparser.ConfigParser()
    ini.read(os.path.join(ROOT, "pytest.ini"))
    return {line.split(":")[0].strip() for line in ini["pytest"]["markers"].splitlines() if line.strip()}


@pytest.mark.parametrize("page", PAGES)
def test_every_command_names_what_exists(page):
    known, checked = settings(), 0
    for command in commands(page):
        words = shlex.split(command)
        if words[:3] == ["python", "-m", "pytest"]:
            for i, w in enumerate(words):
                if w == "-m" and i > 1:
                    names = set(re.findall(r"\w+", words[i + 1])) - {"not", "and", "or"}
                    assert names <= markers(), f"{page}: {command}"
            checked += 1
            continue
        if words[:2] == ["python", "-c"]:
            continue
        script = next((w for w in words if w.endswith(".py")), None)
        assert script and os.path.exists(os.path.join(ROOT, script)), f"{page}: {command}"
        source = read(script)
        args = words[words.index(script) + 1:]
        if script == "train.py":
            for arg in args:
                if arg.startswith("--") and arg != "--help":
                    assert arg[2:].split("=")[0] in known, f"{page}: {command}: {arg}"
                elif arg.startswith("config/"):
                    assert os.path.exists(os.path.join(ROOT, arg)), f"{page}: {command}: {arg}"
        else:
            if args and not args[0].startswith("-") and "add_parser(" in source:
                assert f'add_parser("{args[0]}"' in source, f"{page}: {command}: {args[0]}"
            for arg in args:
                if arg.startswith("--"):
                    assert f'"{arg.split("=")[0]}"' in source, f"{page}: {command}: {arg}"
        checked += 1
    assert checked, f"{page} names no command"


def test_the_course_counts_the_loop_as_it_is():
    lines = read("train.py").splitlines()
    start = lines.index("while True:")
    end = next(i for i in range(start, len(lines)) if lines[i].strip() == "optimizer.step()")
    count = end - start + 1
    assert count <= 50
    stated = re.search(r"From `while True:` to `optimizer.step\(\)` is (\d+) lines", read("docs/course.md"))
    assert stated and int(stated.group(1)) == count


@pytest.mark.parametrize("page", PAGES)
def test_pages_say_what_is_true_not_the_machines_history(page):
    diary = re.compile(r"that night|was moved to|been lent|sessions so far|no GPU (has|was) (been )?(lent|available)",
                       re.I)
    assert not diary.search(read(page))


def test_the_course_points_at_code_that_exists():
    """Each `file -> name` of the course names a function, class, method (Class.method) or module-level
    table defined in that file, or a `the "x" section` that is a `# x...` line of it."""
    pointers = re.findall(r"`(\w+\.py) -> ([^`]+)`", read("docs/course.md"))
    assert len(pointers) >= 20
    for file, name in pointers:
        source = read(file)
        section = re.fullmatch(r'the "(.+)" section', name)
        if section:
            assert re.search(rf"^# {re.escape(section.group(1))}", source, re.M), (file, name)
        elif name == "the loop":
            assert "\nwhile True:\n" in source
        else:
            *owner, leaf = name.split(".")
            assert re.search(rf"^\s*(def|class) {leaf}\b|^{leaf} = ", source, re.M), (file, name)
            if owner:
                assert re.search(rf"^class {owner[0]}\b", source, re.M), (file, name)


def test_the_code_points_at_pages_and_headings_that_exist():
    """The config files' headers and the scripts name the pages of the docs they send a reader to as
    PAGE or PAGE#heading; each must land, and no header points at a section by its title in quotes
    (which moves silently)."""
    sources = sorted(f"config/{f}" for f in os.listdir(os.path.join(ROOT, "config"))) + sorted(
        f for f in os.listdir(ROOT) if f.endswith(".py"))
    found = 0
    for source in sources:
        text = read(source)
        assert not re.search(r'"[^"\n]+" (of|in) (README|docs/)', text), source
        for page, anchor in re.findall(r"\b(README\.md|docs/[\w-]+\.md)(?:#([\w-]+))?", text):
            assert os.path.exists(os.path.join(ROOT, page)), (source, page)
            if anchor:
                assert anchor in {slug(h) for h in re.findall(r"^#+ (.+)$", read(page), re.M)}, (source, anchor)
            found += 1
    assert found >= 5
