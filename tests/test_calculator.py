"""megachat.calculator: nanochat's answers and formatting, and a held-out corpus of escape attempts refused fast
with no side effect, without ever calling eval, exec or compile to code."""
import ast
import builtins
import os
import random
import sys
import time

import pytest

from megachat.calculator import MAX_CHARS, MAX_DEPTH, MAX_INT_BITS, CalculatorError, calculate, evaluate

ESCAPES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "calculator_escapes.txt")
SENTINEL = "calculator_sentinel"  # the file the corpus' side-effect attempts try to create
TIME_LIMIT_S = 0.5  # CPU seconds (process_time): other work on the box does not count against it


def _corpus():
    with open(ESCAPES_FILE, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip() and not line.startswith("#")]


# Attempts that cannot be a line of the corpus file: NUL bytes, newlines, inputs far over the length bound, and
# nests just under it that only the depth bound refuses.
BUILT_ESCAPES = [
    "(" * 10_000 + "1" + ")" * 10_000,
    "-" * 100_000 + "1",
    "-" * (MAX_CHARS - 1) + "1",
    "+" * (MAX_CHARS - 1) + "1",
    "1" + "+1" * (MAX_DEPTH + 1),
    "2" + "**2" * 300,
    "'x'" + ".count('x')" * 80,
    "9" * (MAX_CHARS + 1),
    "'" + "a" * 2 * MAX_CHARS + "'",
    "'a'" + "+'a'" * 100_000,
    "x" * 1_000_000,
    "1\x00+1",
    "'\x00'.count('x')",
    "__import__('os')\x00",
    "1\n__import__('os')",
    "(1\n,__import__('os').system('touch calculator_sentinel'))",
    "1\r\n__import__('os')",
    "'" + "\\" * 999,
    "'a" * 500,
]
ESCAPES = _corpus() + BUILT_ESCAPES


def _timed(fn, *args):
    start = time.process_time()
    result = fn(*args)
    return result, time.process_time() - start


def _refused_fast(expr):
    start = time.process_time()
    with pytest.raises(CalculatorError):
        evaluate(expr)
    assert time.process_time() - start < TIME_LIMIT_S, f"{expr[:80]!r} took too long to refuse"
    assert calculate(expr) is None


@pytest.mark.parametrize("expr,expected", [
    ("10/2", "5.0"),
    ("3*4", "12"),
    ("'strawberry'.count('r')", "3"),
    ('"banana".count("a")', "3"),
    ("'Mississippi'.count('ss')", "2"),
    ("'abc'.count('')", "4"),
    ("1,000+2", "1002"),
    ("1,234,567*2", "2469134"),
    ("(1,200-300)/4", "225.0"),
    ("1,000.50*2", "2001.0"),
    ("'a,b,c'.count(',')", "2"),
    ("'1,000'.count(',')", "1"),
    ("(1+2)*3", "9"),
    ("-3 + +2", "-1"),
    ("--4", "4"),
    ("7//2", "3"),
    ("-7//2", "-4"),
    ("7%3", "1"),
    ("-7%3", "2"),
    ("7.5%2", "1.5"),
    ("2**10", "1024"),
    ("2**-1", "0.5"),
    ("(-2)**3", "-8"),
    ("-2**2", "-4"),
    ("0.1+0.2", "0.30000000000000004"),
    ("1.5*2", "3.0"),
    ("1e3", "1000.0"),
    ("48/2*3", "72.0"),
    ("  12 * 3  ", "36"),
    ("'ab'+'c'", "abc"),
    ("('ab'+'ab').count('b')", "2"),
    ("'__import__'", "__import__"),
    ("'\\x5f\\x5fclass\\x5f\\x5f'", "__class__"),
    ("2**9999 % 7", str(2**9999 % 7)),
    ("(-1)**(2**9998)", "1"),
    ("0**(2**9998)", "0"),
])
def test_answers_and_formatting_match_nanochat(expr, expected):
    assert evaluate(expr) == expected
    assert calculate(expr) == expected


def test_random_arithmetic_matches_python():
    """A differential check of + - * / // % ** and unary minus on ints and floats against Python itself."""
    rng = random.Random(0)

    def expression(depth):
        if depth == 0 or rng.random() < 0.3:
            return rng.choice([str(rng.randint(0, 99)), f"{rng.uniform(0, 50):.2f}"])
        if rng.random() < 0.1:
            return f"-({expression(depth - 1)})"
        if rng.random() < 0.1:
            return f"({expression(depth - 1)})**{rng.randint(0, 3)}"
        return f"({expression(depth - 1)}){rng.choice(['+', '-', '*', '/', '//', '%'])}({expression(depth - 1)})"

    for _ in range(300):
        expr = expression(4)
        try:
            expected = str(eval(expr, {"__builtins__": {}}))  # the test's own trusted expressions
        except ZeroDivisionError:
            _refused_fast(expr)
            continue
        assert evaluate(expr) == expected, expr


def test_corpus_is_large_and_held_out():
    corpus = _corpus()
    assert len(corpus) >= 60
    assert len(set(corpus)) == len(corpus), "duplicate lines in the escape corpus"


@pytest.mark.parametrize("expr", [pytest.param(e, id=f"escape{i}") for i, e in enumerate(ESCAPES)])
def test_escape_attempt_is_refused_fast(expr):
    _refused_fast(expr)


def test_escape_attempts_have_no_side_effect(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evaluate("1+1")  # anything imported on first use is imported before the snapshot
    modules, builtin_names = set(sys.modules), dict(vars(builtins))
    for expr in ESCAPES:
        assert calculate(expr) is None, expr
    assert os.listdir(tmp_path) == [], f"{SENTINEL} or another file was created"
    assert set(sys.modules) == modules
    assert vars(builtins).keys() == builtin_names.keys()
    assert all(vars(builtins)[name] is value for name, value in builtin_names.items())


def test_never_calls_eval_exec_or_compile_to_code(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the calculator called eval or exec")

    real_compile = builtins.compile

    def ast_only_compile(source, filename, mode, flags=0, *args, **kwargs):
        assert flags & ast.PyCF_ONLY_AST, "the calculator compiled code, not only an AST"
        return real_compile(source, filename, mode, flags, *args, **kwargs)

    monkeypatch.setattr(builtins, "eval", refuse)
    monkeypatch.setattr(builtins, "exec", refuse)
    monkeypatch.setattr(builtins, "compile", ast_only_compile)
    assert evaluate("10/2") == "5.0"
    assert evaluate("1,000+2*3") == "1006"
    assert evaluate("'strawberry'.count('r')") == "3"
    assert calculate("__import__('os')") is None


def test_bounds_refuse_just_over_and_accept_just_under():
    assert evaluate("2**9999") == str(2**9999)
    _refused_fast("2**10000")
    assert evaluate("1" + "+1" * (MAX_DEPTH - 1)) == str(MAX_DEPTH)
    _refused_fast("1" + "+1" * MAX_DEPTH)
    assert evaluate(" " * (MAX_CHARS - 1) + "1") == "1"
    _refused_fast(" " * MAX_CHARS + "1")
    assert MAX_INT_BITS >= 1_000  # the bounds leave room for any GSM8K or SpellingBee call


def test_errors_name_what_was_refused():
    with pytest.raises(CalculatorError, match="Name"):
        evaluate("__builtins__")
    with pytest.raises(CalculatorError, match="bits"):
        evaluate("10**100000")
    with pytest.raises(CalculatorError, match="characters"):
        evaluate("1" * (MAX_CHARS + 1))
    with pytest.raises(CalculatorError, match="ZeroDivisionError"):
        evaluate("1/0")
    with pytest.raises(CalculatorError, match="bool literal"):
        evaluate("True")


# The most expensive inputs the bounds accept: big-int powers, divisions and products at the bit limit, the
# longest strings, the deepest chains, and the largest result to format. Each must finish well inside the limit.
WORST_ACCEPTED = [
    "2**9999",
    "3**6300",
    "(2**4999)*(2**4999)",
    "(3**6300)//(7**3000)",
    "(3**6300)%(7**3000+1)",
    "(2**9999)/(2**9998)",
    "+".join(["3**6300%1000"] * 76),
    "+".join(["(3**6300)//(3**6299)"] * 45),
    "1" + "+1" * (MAX_DEPTH - 1),
    "'" + "a" * (MAX_CHARS - 13) + "'.count('a')",
    "'" + "ab" * 330 + "'.count('" + "ab" * 160 + "')",
    "+".join(["'" + "x" * 20 + "'"] * 40),
    "+".join(["(-1)**(2**9998)"] * 60),
]


@pytest.mark.parametrize("expr", [pytest.param(e, id=f"worst{i}") for i, e in enumerate(WORST_ACCEPTED)])
def test_worst_accepted_inputs_finish_fast(expr):
    assert len(expr) <= MAX_CHARS
    result, seconds = _timed(evaluate, expr)
    assert result
    assert seconds < TIME_LIMIT_S, f"{seconds:.3f} s"
