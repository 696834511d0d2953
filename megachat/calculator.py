"""The calculator tool: what the inference engine runs on the text between <|python_start|> and <|python_end|>.

It owns which text is evaluated and how the answer is written back: `str(result)` as in nanochat
(`10/2` -> "5.0", `3*4` -> "12", `'strawberry'.count('r')` -> "3").

Why a whitelist: nanochat refuses a list of substrings and then calls `eval`, so every escape the list does not
foresee runs (attribute walks, identifiers that NFKC turns into `eval`, `9**9**9`). Here the text is parsed with
`ast.parse(mode="eval")` (an AST, never code) and a small interpreter evaluates only these nodes:
- int and float literals (not bool, complex, bytes or None), unary + and -, and + - * / // % ** on numbers;
- str literals, str + str, and `s.count(t)` with one positional str argument (SpellingBee's tool call).
Everything else is refused. No name is looked up and no attribute is fetched: `.count` is run as `str.count`
on a value of exact type str, so nothing the text did not write as a literal can be reached. eval, exec and
compile to code are never called.

Bounds, each checked before the work it limits:
- input <= MAX_CHARS characters; AST <= MAX_NODES nodes and <= MAX_DEPTH deep (checked without recursion,
  before the recursive interpreter runs);
- ints <= MAX_INT_BITS bits (a power is refused from its operands' sizes before it is computed), floats finite
  (overflow is an error), strs <= MAX_CHARS (they can only be concatenated, so this holds by construction).
So at most MAX_NODES operations run, each on bounded operands: evaluation ends within milliseconds with no
timer (tests/test_calculator.py times the worst accepted inputs).

Commas: digit-group commas outside string literals are removed first (`1,000+2` -> 1002), where nanochat removes
every comma; the others stay, so `(1,)` is a tuple and refused, `1,2` is refused (nanochat: 12), and
`'a,b'.count(',')` is 1. The scanner does not know triple quotes; at worst a digit-group comma inside one is lost.

Errors raise CalculatorError (a ValueError) naming what was refused; `calculate` turns them into None, which the
engine reads as "inject nothing", as nanochat does.
"""
from __future__ import annotations

import ast
import math
import operator
import re
import warnings

MAX_CHARS = 1_000
MAX_NODES = 1_000
MAX_DEPTH = 100
MAX_INT_BITS = 10_000

_ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
               ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
# group 1: a quoted string, kept whole; otherwise a comma between a digit and exactly three digits, dropped.
_DIGIT_GROUP_COMMA = re.compile(r"""('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")|(?<=\d),(?=\d{3}(?!\d))""", re.DOTALL)


class CalculatorError(ValueError):
    """The text is not a calculation this tool evaluates; the message says why."""


def calculate(expr: str) -> str | None:
    """The tool output for `expr` that the engine injects, or None when `expr` is refused (inject nothing)."""
    try:
        return evaluate(expr)
    except CalculatorError:
        return None


def evaluate(expr: str) -> str:
    """str() of the value of `expr`; raises CalculatorError naming what was refused."""
    if len(expr) > MAX_CHARS:
        raise CalculatorError(f"expression of {len(expr)} characters; at most {MAX_CHARS} are evaluated")
    text = _DIGIT_GROUP_COMMA.sub(lambda m: m.group(1) or "", expr).strip()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. the SyntaxWarning of an invalid escape like '\d'
            tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as e:  # ValueError: a NUL byte
        raise CalculatorError(f"not a Python expression: {e}") from None
    _check_size(tree)
    return str(_eval(tree.body))


def _check_size(tree: ast.AST) -> None:
    stack, nodes = [(tree, 0)], 0
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise CalculatorError(f"expression over {MAX_NODES} AST nodes")
        if depth > MAX_DEPTH:
            raise CalculatorError(f"expression nested over {MAX_DEPTH} levels deep")
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))


def _eval(node: ast.AST) -> int | float | str:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float, str):
        return _bounded(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        operand = _eval(node.operand)
        if type(operand) is str:
            raise CalculatorError(f"unary {type(node.op).__name__} on a str")
        return _UNARY[type(node.op)](operand)
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
        return _bounded(_binop(node.op, _eval(node.left), _eval(node.right)))
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "count"
            and len(node.args) == 1 and not node.keywords):
        text, sub = _eval(node.func.value), _eval(node.args[0])
        if type(text) is str and type(sub) is str:
            return text.count(sub)
        raise CalculatorError(".count is only run on a str, with one str argument")
    what = f"{type(node.value).__name__} literal" if isinstance(node, ast.Constant) else type(node).__name__
    raise CalculatorError(f"{what} is not allowed: only int, float and str literals, + - * / // % **, unary + -, "
                          f"and str.count(str)")


def _binop(op: ast.operator, left: int | float | str, right: int | float | str) -> int | float | str:
    if type(left) is str and type(right) is str and isinstance(op, ast.Add):
        return left + right
    if type(left) is str or type(right) is str:
        raise CalculatorError(f"{type(op).__name__} with a str: strings take only + (with a str) and .count")
    if (isinstance(op, ast.Pow) and type(left) is int and type(right) is int and right > 0 and abs(left) > 1
            and (abs(left).bit_length() - 1) * right > MAX_INT_BITS):
        raise CalculatorError(f"power over {MAX_INT_BITS} bits")
    try:
        return _ARITHMETIC[type(op)](left, right)
    except ArithmeticError as e:  # ZeroDivisionError; OverflowError of floats and of big ints made floats
        raise CalculatorError(f"{type(e).__name__}: {e}") from None


def _bounded(value: object) -> int | float | str:
    if type(value) is int and value.bit_length() > MAX_INT_BITS:
        raise CalculatorError(f"integer over {MAX_INT_BITS} bits")
    if type(value) is float and not math.isfinite(value):
        raise CalculatorError(f"float result {value} (overflow)")
    if type(value) is str and len(value) > MAX_CHARS:
        raise CalculatorError(f"string over {MAX_CHARS} characters")
    if type(value) not in (int, float, str):
        raise CalculatorError(f"{type(value).__name__} result: only int, float and str are returned")
    return value
