"""The README and docs/ stay true: every command shown parses, every linked file exists, every
figure of the benchmark and experiment pages is in the results file its section links, every
results file a page links records what produced it, and the configuration reference is what the
pydantic models give.

Commands are read from the fenced code blocks (whole command lines, checked with the CLI's own
argparse parser) and from inline code spans (their subcommand and --flags checked, as spans may hold
placeholders such as COMMAND or STEP).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest

from sparse_ssm.cli.parser import build_parser

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
SPAN = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
RESULTS_PATH = re.compile(r"bench/results/(?:[A-Za-z0-9_./-]|\{[A-Za-z0-9_.,-]*\})+")
PERCENT = re.compile(r"\d+(?:\.\d+)?%")
PLACEHOLDER = re.compile(r"^[A-Z][A-Z_]*$")


def results_paths(text: str) -> list[str]:
    """The bench/results paths a text names, braces expanded (`x.{json,md}` is x.json and x.md)."""
    paths = []
    for path in RESULTS_PATH.findall(text):
        todo = [path.rstrip(".")]
        while todo:
            head, brace, rest = todo.pop().partition("{")
            if not brace:
                paths.append(head)
                continue
            options, _, tail = rest.partition("}")
            todo += [head + option + tail for option in options.split(",")]
    return paths


def _rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


def fenced_commands(text: str) -> list[str]:
    """The command lines of a page's fenced blocks, continuation lines joined."""
    lines = []
    for block in FENCE.findall(text):
        lines += block.replace("\\\n", " ").splitlines()
    return [line.strip() for line in lines if line.strip()]


def inline_commands(text: str) -> list[str]:
    """The code spans outside fenced blocks that hold a command."""
    prose = FENCE.sub("", text)
    return [s for s in SPAN.findall(prose) if re.match(r"(python|make|torchrun|taskset)\b", s)]


def words(command: str) -> list[str]:
    try:
        return shlex.split(command, comments=True)
    except ValueError:                                   # an unbalanced quote in a prose span
        return command.split()


def _subparsers():
    parser = build_parser()
    return parser, next(a for a in parser._actions if a.choices and "train" in a.choices).choices


def _makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z][A-Za-z0-9_-]*)\s*:(?!=)", text, re.M))


def _script_flags(script: Path) -> set[str]:
    """The --flags a bench script's argparse declares (read from its source: importing it may need the peers)."""
    return set(re.findall(r"add_argument\(\s*\"(--[a-z0-9-]+)\"", script.read_text()))


def check_command(tokens: list[str], whole: bool) -> list[str]:
    """What is wrong with one command (empty if nothing): `whole` lines are also parsed for their values."""
    problems = []
    script = next((t for t in tokens if t.endswith(".py")), None)
    args = tokens[tokens.index(script) + 1:] if script else tokens[1:]
    flags = [t.split("=")[0] for t in args if t.startswith("--") and len(t) > 2]
    if script == "main.py":
        parser, commands = _subparsers()
        if not args or args[0].startswith("-"):
            return [] if set(args) <= {"--help", "-h"} else [f"main.py needs a command: {args}"]
        if PLACEHOLDER.match(args[0]):
            return []
        if args[0] not in commands:
            return [f"main.py has no command {args[0]!r}"]
        known = set(commands[args[0]]._option_string_actions)
        problems += [f"main.py {args[0]} has no flag {f}" for f in flags if f not in known]
        if whole and not problems and "--help" not in args:
            try:
                parser.parse_args(args)
            except SystemExit:
                problems.append(f"main.py does not parse: {' '.join(args)}")
    elif tokens[0] == "make":
        targets = [t for t in tokens[1:] if "=" not in t and not t.startswith("-")]
        problems += [f"the Makefile has no target {t!r}" for t in targets if t not in _makefile_targets()]
    elif script:
        script = ROOT / script
        if not script.is_file():
            return [f"no script {script.relative_to(ROOT)}"]
        if script.parent.name == "bench":
            known = _script_flags(script)
            problems += [f"{script.name} has no flag {f}" for f in flags if f not in known | {"--help"}]
    elif tokens[:2] == ["python", "-m"] and tokens[2].startswith("sparse_ssm"):
        if importlib.util.find_spec(tokens[2]) is None:
            problems.append(f"no module {tokens[2]}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_command_parses(page):
    """python main.py lines parse with the CLI's parser, make targets exist, bench scripts have the flags shown."""
    text = page.read_text()
    problems = []
    for command, whole in [*((c, True) for c in fenced_commands(text)), *((c, False) for c in inline_commands(text))]:
        tokens = words(command)
        if tokens and re.match(r"(python|make|torchrun|taskset)$", tokens[0]):
            problems += [f"{command!r}: {p}" for p in check_command(tokens, whole)]
    assert not problems, "\n".join(problems)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_slug(h) for h in re.findall(r"^#+ (.+)$", FENCE.sub("", page.read_text()), re.M)}


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_linked_file_exists(page):
    """Relative Markdown links (and their #anchors) and every bench/results path named resolve."""
    text = FENCE.sub("", page.read_text())
    problems = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            problems.append(f"link to a missing file: {target}")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            problems.append(f"link to a missing heading: {target}")
    problems += [f"missing: {p}" for p in results_paths(text) if not (ROOT / p).exists()]
    assert not problems, "\n".join(problems)


def _results_json(target: Path) -> list[Path]:
    """The JSON files behind a linked results path: itself, the NAME.json beside NAME.md / NAME.png,
    or every JSON under a folder."""
    if target.is_dir():
        return sorted(target.rglob("*.json"))
    return [target if target.suffix == ".json" else target.with_suffix(".json")]


def provenance_problems(data) -> list[str]:
    """What a results file's JSON lacks of its provenance (bench/provenance.py): a "provenance" block
    with the git commit and the package versions, and the config of what ran (each model's config in
    the block, a "config" in every row or cell, or the run's "setup")."""
    prov = data.get("provenance") if isinstance(data, dict) else None
    if not isinstance(prov, dict):
        return ["no provenance block"]
    problems = [] if (prov.get("git") or {}).get("commit") else ["no git commit"]
    problems += [] if (prov.get("versions") or {}).get("torch") else ["no package versions"]
    models = [m.get("config") for m in (prov.get("models") or {}).values()] or [prov.get("model_config")]
    records = [r for v in data.values() if isinstance(v, list) for r in v if isinstance(r, dict)]
    if not ((models and all(models)) or (records and all(r.get("config") for r in records)) or data.get("setup")):
        problems.append("no config of what ran")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_linked_results_file_records_provenance(page):
    """Each bench/results file a page links or names has a JSON beside it that records the commit,
    the versions and the config that produced it."""
    text = FENCE.sub("", page.read_text())
    targets = {(page.parent / t.partition("#")[0]).resolve() for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)}
    targets |= {(ROOT / p).resolve() for p in results_paths(text)}
    problems = []
    for target in sorted(t for t in targets if t.is_relative_to(ROOT / "bench" / "results") and t.exists()):
        for path in _results_json(target):
            found = provenance_problems(json.loads(path.read_text())) if path.is_file() else ["no results JSON"]
            problems += [f"{path.relative_to(ROOT)} (linked as {target.relative_to(ROOT)}): {p}" for p in found]
    assert not problems, "\n".join(problems)


def _sections(text: str) -> list[str]:
    return re.split(r"^#+ .*$", text, flags=re.M)


@pytest.mark.parametrize("name", ["benchmarks.md", "experiments.md", "state_tracking.md"])
def test_every_figure_is_in_a_linked_results_file(name):
    """In each section, every percentage (and, for benchmarks, every table row) is in a results file
    that the section links or names."""
    page = ROOT / "docs" / name
    problems = []
    for section in _sections(page.read_text()):
        files = {(page.parent / t.partition("#")[0]).resolve() for t in LINK.findall(section)}
        files |= {ROOT / p for p in results_paths(section)}
        results = "\n".join(f.read_text() for f in files
                            if f.suffix == ".md" and f.is_file() and "bench/results" in str(f))
        problems += [f"{figure} is in no results file the section links" for figure in PERCENT.findall(section)
                     if figure not in results]
        if name == "benchmarks.md":
            rows = [r for r in section.splitlines() if r.startswith("|") and not r.startswith("|--")
                    and not r.startswith("|:")]
            problems += [f"row not in its results file: {r}" for r in rows if r not in results]
    assert not problems, "\n".join(problems)


def test_configuration_reference_is_generated_from_the_models():
    """docs/configuration.md is what docs/make_config_reference.py writes from the pydantic sections."""
    spec = importlib.util.spec_from_file_location("make_config_reference", ROOT / "docs" / "make_config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (ROOT / "docs" / "configuration.md").read_text() == module.render(), \
        "docs/configuration.md is out of date: run python docs/make_config_reference.py"


def test_readme_is_short():
    """The README is an entry page; the details live in docs/."""
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300
