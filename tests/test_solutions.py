"""notebooks/solutions/: one notebook per lesson, one solution per exercise, written as the lessons are.

Each lesson ends with a numbered "## Exercises" list; its solutions notebook (named in .ci/navigation.py,
derived from ``COURSE``) has one "## Exercise N" section per exercise, in order, quoting the exercise
word for word, with a code cell that runs the solution and an answer. A new exercise without a
solution, or an exercise reworded without its solution, fails here. nbval runs the notebooks
themselves on the tiny stand-in (``pytest notebooks``; CI's step 3).
"""

import ast
import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("navigation", ROOT / ".ci" / "navigation.py")
navigation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(navigation)
spec = importlib.util.spec_from_file_location("lesson_rules", Path(__file__).parent / "test_notebooks.py")
lesson_rules = importlib.util.module_from_spec(spec)  # the lessons' rules for figures in prose, reused
spec.loader.exec_module(lesson_rules)

PAIRS = [(ROOT / "notebooks" / name, ROOT / "notebooks" / navigation.SOLUTIONS / navigation.solutions_name(name))
         for name, _ in navigation.COURSE]
HEADING = re.compile(r"^## Exercise (\d+)\s*$", re.M)
# what denoises, compiles or launches GPU work: a cell that calls one prints fluxnb.planner.eta(...) first
LONG_CALLS = {"denoise", "first_picture", "make_images", "time_steps", "run_split", "launch", "compile_repeated_blocks",
              "generate"}

def _source(cell: dict) -> str:
    return "".join(cell["source"])


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def _normal(text: str) -> str:
    return " ".join(text.split())


def exercises(cells: list[dict]) -> list[str]:
    """A lesson's exercises: the numbered items under its "## Exercises" heading, continuation lines joined."""
    texts = [_source(c) for c in cells if c["cell_type"] == "markdown" and "## Exercises" in _source(c)]
    assert len(texts) == 1, "a lesson has one '## Exercises' list"
    block = re.split(r"\n#{1,3} ", texts[0].split("## Exercises", 1)[1])[0]
    items: list[list[str]] = []
    for line in block.strip().splitlines():
        number = re.match(r"^(\d+)\. (.*)", line)
        if number:
            assert int(number.group(1)) == len(items) + 1, f"exercises are numbered 1, 2, ...: {line!r}"
            items.append([number.group(2)])
        elif line.strip() and items:
            items[-1].append(line.strip())
    return [_normal(" ".join(item)) for item in items]


def solutions(cells: list[dict]) -> list[dict]:
    """A solutions notebook's sections: number, quoted exercise, and the cells up to the next section."""
    found = []
    for i, cell in enumerate(cells):
        match = HEADING.search(_source(cell)) if cell["cell_type"] == "markdown" else None
        if match:
            quote = []
            for line in _source(cell)[match.end():].strip().splitlines():  # the "> ..." lines after the heading
                if not line.startswith(">"):
                    break
                quote.append(line[1:].strip())
            found.append(dict(number=int(match.group(1)), quote=_normal(" ".join(quote)), start=i))
    for section, after in zip(found, [*(s["start"] for s in found[1:]), len(cells)]):
        section["cells"] = cells[section["start"] + 1:after]
    return found


def test_every_lesson_has_its_solutions_notebook_and_nothing_else_is_there():
    assert navigation.layout_problems() == []
    assert len(PAIRS) == 13 and all(solved.is_file() for _, solved in PAIRS)


@pytest.mark.parametrize("lesson, solved", PAIRS, ids=lambda p: p.stem)
def test_one_solution_per_exercise_quoting_it_word_for_word(lesson, solved):
    asked, answered = exercises(_cells(lesson)), solutions(_cells(solved))
    assert asked, f"{lesson.name} has no exercises"
    assert [s["number"] for s in answered] == list(range(1, len(asked) + 1)), \
        f"{solved.name} answers exercises {[s['number'] for s in answered]}; {lesson.name} has {len(asked)}"
    for text, section in zip(asked, answered):
        assert section["quote"] == text, f"{solved.name}, exercise {section['number']}: quote it as the lesson words it"


@pytest.mark.parametrize("lesson, solved", PAIRS, ids=lambda p: p.stem)
def test_each_solution_runs_code_and_explains_it(lesson, solved):
    for section in solutions(_cells(solved)):
        kinds = [c["cell_type"] for c in section["cells"]]
        assert "code" in kinds, f"{solved.name}, exercise {section['number']}: no code cell runs the solution"
        text = "\n".join(_source(c) for c in section["cells"] if c["cell_type"] == "markdown")
        assert "**Answer.**" in text, f"{solved.name}, exercise {section['number']}: no answer that explains why"


@pytest.mark.parametrize("lesson, solved", PAIRS, ids=lambda p: p.stem)
def test_written_as_the_lessons_are(lesson, solved):
    cells = _cells(solved)
    first = _source(cells[0])
    i = [name for name, _ in navigation.COURSE].index(lesson.name)
    assert f"\n# {navigation.solutions_title(i)}\n" in first and f"](../{lesson.name})" in first
    code = [c for c in cells if c["cell_type"] == "code"]
    setup = next(_source(c) for c in _cells(lesson) if c["cell_type"] == "code")
    assert _source(code[0]) == setup, f"{solved.name}: its first code cell is the lesson's setup cell (the Colab install)"
    assert "CHECKPOINT = fluxnb.resolve_checkpoint(MODEL_ID)" in _source(code[1]), "the parameters cell comes next"
    for cell in code:
        source = _source(cell)
        assert cell["outputs"] == [] and cell["execution_count"] is None, f"{solved.name}: outputs committed"
        assert "except:" not in source and "except Exception" not in source, f"{solved.name}: a swallowed failure"
        calls, etas = _calls(source)  # parses the cell too: no syntax this Python lacks
        if calls:
            assert etas and min(etas) <= min(calls), \
                f"{solved.name}: print fluxnb.planner.eta(...) before denoising or compiling: {source[:80]!r}"


def _code(source: str) -> str:
    """A cell's source as Python: IPython's ``%`` lines become ``pass`` (same line numbers, same blocks)."""
    return "\n".join(line[:len(line) - len(line.lstrip())] + "pass" if line.lstrip().startswith("%") else line
                     for line in source.splitlines())


def _calls(source: str) -> tuple[list[int], list[int]]:
    """Lines where the cell itself calls something in ``LONG_CALLS`` (not inside a ``def`` or ``lambda``,
    which only runs when called), and lines where it or its helpers call ``planner.eta``."""
    tree = ast.parse(_code(source))
    calls: list[int] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return
        if isinstance(node, ast.Call):
            name = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
            if name in LONG_CALLS:
                calls.append(node.lineno)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    etas = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", None) == "eta"]
    return calls, etas


@pytest.mark.parametrize("lesson, solved", PAIRS, ids=lambda p: p.stem)
def test_no_hand_typed_figures_and_current_facts(lesson, solved):
    from benchmarks import report

    facts = report.model_facts()
    for cell in _cells(solved):
        if cell["cell_type"] != "markdown":
            continue
        text = _source(cell)
        assert report.fill_facts(text, facts) == text, f"{solved.name}: stale fact span; run python -m benchmarks report"
        prose = lesson_rules.TYPED_ON_PURPOSE.sub("", report.FACT.sub("", lesson_rules.REGION.sub("", text)))
        typed = [prose[max(0, m.start() - 40):m.end() + 10] for m in lesson_rules.FIGURE.finditer(prose)]
        assert not typed, f"{solved.name}: typed figures {typed}: print them from a cell, or use a fact span"


def test_the_checks_can_fail():
    """A lesson with a third exercise, or a reworded one, is caught; and so is a denoising cell without an ETA."""
    lesson = [{"cell_type": "markdown", "source": ["## Exercises\n\n1. Do this.\n2. Do that,\n   twice.\n3. New.\n"]}]
    solved = [{"cell_type": "markdown", "source": [f"## Exercise {n}\n\n> {text}\n\nHow."]}
              for n, text in ((1, "Do this."), (2, "Do that, twice."))]
    assert exercises(lesson) == ["Do this.", "Do that, twice.", "New."]
    assert [s["quote"] for s in solutions(solved)] == exercises(lesson)[:2]  # the third has no solution
    solved[1]["source"] = ["## Exercise 2\n\n> Do that.\n"]
    assert solutions(solved)[1]["quote"] != exercises(lesson)[1]
    assert _calls("latents = fluxnb.denoise(pipe, embeds)") == ([1], [])  # no ETA: fails the test above
    assert _calls("print(fluxnb.planner.eta(4, 64, 64))\nlatents = fluxnb.denoise(pipe, embeds)") == ([2], [1])
    assert _calls("def make(pipe):\n    return fluxnb.denoise(pipe, embeds)") == ([], [])  # defined, not run
