"""megachat.report: the report card of a whole run, built from its run directories alone (no model, no GPU).

A phase is one run directory (base, mid, sft, rl, in the order given): its config.json, metrics.jsonl, and if
present env.json (the training machine: hostname, GPUs, versions), base_eval.csv/.md and chat_eval.csv.
`write_report(run_dirs, out_dir)` writes out_dir/report.md: the environment and layout, tokenizer and data, each
phase's settings, steps, tokens, duration and compute with its CORE / ChatCORE tables and samples, the loss and
val-bpb curves (PNG, one line per phase), the summary table (BASE / MID / SFT / RL) and the totals.
Imports neither torch nor the model; matplotlib draws without a display (Agg, no pyplot state).
"""
from __future__ import annotations

import csv
import datetime
import io
import json
import os
import platform
import subprocess
from dataclasses import dataclass, field
from importlib import metadata

from matplotlib.figure import Figure

from megachat.data import IndexedDataset
from megachat.fileio import atomic_write

PHASE_COLUMNS = {"base": "BASE", "mid": "MID", "sft": "SFT", "rl": "RL"}
# Summary rows: (label, which eval file, metric name in it).
SUMMARY_ROWS = [("CORE", "base", "core"), ("ARC-E", "chat", "ARC-Easy"), ("ARC-C", "chat", "ARC-Challenge"),
                ("MMLU", "chat", "MMLU"), ("GSM8K", "chat", "GSM8K"), ("HumanEval", "chat", "HumanEval"),
                ("SpellingBee", "chat", "SpellingBee"), ("ChatCORE", "chat", "chatcore")]
CURVES = [("loss", "train loss"), ("val_bpb", "validation bits per byte")]
LAYOUT_KEYS = ["world", "tp", "pp", "dp", "zero", "dtype"]
TIME_KEYS = ("time", "timestamp")  # unix seconds, if a metrics.jsonl record carries them


@dataclass
class Phase:
    """One run directory as read from disk; the numbers below are derived from it."""
    name: str
    run_dir: str
    config: dict
    env: dict = field(default_factory=dict)  # env.json, {} when the run did not record one
    records: list = field(default_factory=list)  # metrics.jsonl, one dict per line
    base_eval: dict = field(default_factory=dict)  # base_eval.csv: metric -> value (text)
    chat_eval: dict = field(default_factory=dict)  # chat_eval.csv with the "chat/" prefix taken off
    samples: list = field(default_factory=list)  # base_eval.md's sample lines

    @property
    def train(self) -> dict:
        return self.config.get("train") or {}

    @property
    def steps(self) -> int:
        return max((r["step"] for r in self.records if "loss" in r), default=0)

    @property
    def tokens(self) -> int | None:
        batch = self.train.get("total_batch_size")
        return self.steps * batch if batch else None

    @property
    def flops(self) -> float | None:
        per_token = self.config.get("flops_per_token")
        return per_token * self.tokens if per_token and self.tokens is not None else None

    @property
    def step_time_s(self) -> float:
        return sum(r.get("step_time_s", 0.0) for r in self.records)

    @property
    def wall_s(self) -> float | None:
        times = [r[k] for r in self.records for k in TIME_KEYS if isinstance(r.get(k), (int, float))]
        return max(times) - min(times) if len(times) >= 2 else None

    def curve(self, key: str) -> list[tuple[int, float]]:
        return [(r["step"], r[key]) for r in self.records if isinstance(r.get(key), (int, float))]


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the run directory is damaged") from None


def _read_metrics(path: str) -> list[dict]:
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{path}: line {n} is not valid JSON; the run directory is damaged") from None
    return records


def _read_csv(path: str) -> dict:
    """An eval CSV (metric,value rows) as {metric: value}; chat_eval.csv's "chat/" prefix is taken off."""
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if len(r) >= 2 and r[0] != "metric"]
    return {k.removeprefix("chat/"): v for k, v, *_ in rows}


def _read_samples(path: str) -> list[str]:
    """The sample lines of base_eval.md's Samples section."""
    with open(path) as f:
        return [s for s in f.read().partition("## Samples")[2].splitlines() if s.startswith("- ")]


# The files a run directory may hold besides config.json: file -> (Phase field, reader).
OPTIONAL_FILES = {"env.json": ("env", _read_json), "metrics.jsonl": ("records", _read_metrics),
                  "base_eval.csv": ("base_eval", _read_csv), "chat_eval.csv": ("chat_eval", _read_csv),
                  "base_eval.md": ("samples", _read_samples)}


def read_phase(run_dir: str) -> Phase:
    """Read one run directory; raises FileNotFoundError / ValueError naming the path when it is not one."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"{run_dir}: no such run directory; pass the --out directory of a training run")
    if not os.path.isfile(os.path.join(run_dir, "config.json")):
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.json); pass the --out directory of "
                                "a training run")
    config = _read_json(os.path.join(run_dir, "config.json"))
    phase = Phase(config.get("phase") or os.path.basename(os.path.normpath(run_dir)), run_dir, config)
    for name, (attribute, read) in OPTIONAL_FILES.items():
        if os.path.isfile(os.path.join(run_dir, name)):
            setattr(phase, attribute, read(os.path.join(run_dir, name)))
    return phase


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def fmt_value(value) -> str:
    """A metric as 4 decimals; text (task counts, '-') as it is; None as '-'."""
    if value is None or value == "":
        return "-"
    try:
        return f"{float(value):.4f}"
    except (TypeError, ValueError):
        return str(value)


def fmt_number(x, spec: str = ",") -> str:
    return "-" if x is None else format(x, spec)


def _total(values: list) -> float | None:
    """The sum of the known values; None when none is known."""
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)] + \
           ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def report_machine() -> list[str]:
    """The machine building this report (not the one that trained): versions and megachat's git commit."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        git = subprocess.run(["git", "-C", repo, "describe", "--always", "--dirty", "--abbrev=40"],
                             capture_output=True, text=True, timeout=30)
        commit = git.stdout.strip() if git.returncode == 0 else "unknown (megachat is not in a git checkout)"
    except (OSError, subprocess.TimeoutExpired):
        commit = "unknown (git not available)"
    return [f"- megachat git commit (where this report was built): {commit}",
            f"- report built on: {platform.node()}, {platform.platform()}, python {platform.python_version()}, "
            f"torch {_version('torch')}, deepspeed {_version('deepspeed')} (this machine, not necessarily the "
            "training machine)"]


def _env_line(p: Phase) -> str:
    if not p.env:
        return f"- {p.name}: no env.json (hardware and versions not recorded by this run)"
    items = (f"{k}={', '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in p.env.items())
    return f"- {p.name}: " + "; ".join(items)


def _data_cell(prefixes) -> str:
    """Each data prefix with its token count when PREFIX.idx/.bin are readable here."""
    cells = []
    for prefix in [prefixes] if isinstance(prefixes, str) else prefixes or []:
        try:
            cells.append(f"`{prefix}` ({IndexedDataset(prefix).num_tokens:,} tokens)")
        except (OSError, ValueError):
            cells.append(f"`{prefix}` (not readable here)")
    return ", ".join(cells) or "-"


def phase_section(i: int, p: Phase) -> list[str]:
    t, model = p.train, p.config.get("model") or {}
    val = p.curve("val_bpb")
    rows = [["steps", fmt_number(p.steps)],
            ["tokens", f"{fmt_number(p.tokens)} ({p.steps:,} steps x {fmt_number(t.get('total_batch_size'))})"],
            ["compute", f"{fmt_number(p.flops, '.3e')} FLOPs "
                        f"({fmt_number(p.config.get('flops_per_token'), '.3e')} per token)"],
            ["step time", f"{fmt_duration(p.step_time_s)} (sum of step_time_s)"],
            ["wall time", fmt_duration(p.wall_s) if p.wall_s is not None else "- (no timestamps in metrics.jsonl)"],
            ["final loss", fmt_value(p.curve("loss")[-1][1] if p.curve("loss") else None)],
            ["val bpb (first -> last)", f"{fmt_value(val[0][1])} -> {fmt_value(val[-1][1])}" if val else "-"],
            ["parameters", fmt_number(p.config.get("num_params"))],
            ["model", " ".join(f"{k}={v}" for k, v in model.items()) or "-"],
            ["settings", " ".join(f"{k}={v}" for k, v in t.items()) or "-"]]
    lines = [f"## Phase {i}: {p.name}", "", f"Run directory: `{p.run_dir}`", ""] + _table(["", p.name], rows)
    if p.base_eval:
        core = p.base_eval.get("core")
        lines += ["", "### CORE", "", f"val bpb {fmt_value(p.base_eval.get('val_bpb'))}; CORE {fmt_value(core)} "
                  f"over {p.base_eval.get('core_tasks', '-')} tasks; missing: {p.base_eval.get('core_missing', '-')}",
                  ""] + _table(["task", "centered"], [[k.removeprefix("core/"), fmt_value(v)]
                                                      for k, v in p.base_eval.items() if k.startswith("core/")])
    if p.chat_eval:
        lines += ["", "### ChatCORE", ""] + _table(["metric", "value"],
                                                   [[k, fmt_value(v)] for k, v in p.chat_eval.items()])
    if p.samples:
        lines += ["", "### Samples", ""] + p.samples
    return lines + [""]


def plot_curve(phases: list[Phase], key: str, label: str, path: str) -> int:
    """Draw `key` against the step counted across phases, one line per phase that logged it; write the PNG
    atomically if any did. Returns the number of lines drawn."""
    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.add_subplot()
    offset, lines = 0, 0
    for i, p in enumerate(phases):
        points = p.curve(key)
        if points:  # colour C{i}: a phase has the same colour in every plot
            ax.plot([offset + s for s, _ in points], [v for _, v in points], f"C{i}", label=p.name, linewidth=1.5,
                    marker="o" if len(points) < 30 else None, markersize=3)
            lines += 1
        if offset:  # where this phase starts
            ax.axvline(offset, color="0.7", linestyle=":", linewidth=1)
            ax.text(offset, 0.98, f" {p.name}", transform=ax.get_xaxis_transform(), va="top", color="0.4")
        offset += max([p.steps] + [s for s, _ in points])
    if lines:
        ax.set(xlabel="step (counted across phases, in the order given)", ylabel=label, title=label)
        ax.grid(alpha=0.3)
        ax.legend()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight")
        atomic_write(path, buf.getvalue())
    return lines


def build_report(phases: list[Phase], plots: dict[str, int]) -> str:
    """report.md's text; `plots` maps each curve's key to the number of lines drawn in KEY.png."""
    layout = [[p.name] + [p.config.get(k, p.train.get(k, "-")) for k in LAYOUT_KEYS] for p in phases]
    data = [[p.name, fmt_number((p.config.get("model") or {}).get("vocab_size") or p.train.get("vocab_size")),
             f"`{p.config.get('tokenizer', '-')}`", _data_cell(p.config.get("data")),
             _data_cell(p.config.get("val_data"))] for p in phases]
    md = ["# megachat report card", "", f"Generated {datetime.datetime.now().isoformat(timespec='seconds')} from "
          f"{len(phases)} run director{'y' if len(phases) == 1 else 'ies'}.", "", "## Environment", ""]
    md += report_machine() + ["", "Recorded by the runs (env.json):", ""] + [_env_line(p) for p in phases]
    md += ["", "Layout (config.json):", ""] + _table(["phase"] + LAYOUT_KEYS, layout)
    md += ["", "## Tokenizer and data", ""] + _table(["phase", "vocab size", "tokenizer", "data", "val data"], data)
    md += [""]
    for i, p in enumerate(phases, 1):
        md += phase_section(i, p)
    md += ["## Curves", ""]
    for key, label in CURVES:
        md += [f"![{label}]({key}.png)" if plots.get(key) else f"No {key} records in any metrics.jsonl.", ""]
    columns = [PHASE_COLUMNS.get(p.name.lower(), p.name) for p in phases]
    summary = [[label] + [fmt_value((p.base_eval if src == "base" else p.chat_eval).get(name)) for p in phases]
               for label, src, name in SUMMARY_ROWS]
    md += ["## Summary", ""] + _table(["metric"] + columns, summary)
    md += ["", "## Total", "", f"- step time: {fmt_duration(sum(p.step_time_s for p in phases))} (sum of step_time_s "
           f"over all phases)", f"- wall time: {fmt_duration(_total([p.wall_s for p in phases]))} (phases with "
           f"timestamps)", f"- tokens: {fmt_number(_total([p.tokens for p in phases]))}",
           f"- compute: {fmt_number(_total([p.flops for p in phases]), '.3e')} FLOPs", ""]
    return "\n".join(md)


def write_report(run_dirs: list[str], out_dir: str) -> str:
    """Read the phases, draw the curves into out_dir, write out_dir/report.md atomically; returns its path."""
    phases = [read_phase(d) for d in run_dirs]
    os.makedirs(out_dir, exist_ok=True)
    plots = {key: plot_curve(phases, key, label, os.path.join(out_dir, f"{key}.png")) for key, label in CURVES}
    path = os.path.join(out_dir, "report.md")
    atomic_write(path, build_report(phases, plots))
    return path
