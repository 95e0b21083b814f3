"""Offline text datasets: Reuters-21578 (corn, grain) and Debian fortunes.

Both come from Debian packages that ``make data`` downloads (``apt-get download``, no
root needed) and unpacks with ``dpkg -x`` into ``.cache/`` of the repository:

* ``weka`` (3.6.14): ``usr/share/doc/weka/examples/Reuters{Corn,Grain}-{train,test}.arff``
  into ``.cache/weka/``;
* ``fortunes`` (1:1.99.1): the plain-text cookie files of ``usr/share/games/fortunes/``
  into ``.cache/fortunes/``.

The files are looked up first in ``$VEIL_DATA_DIR`` (a directory holding ``weka/`` and
``fortunes/``) and then in ``<repo>/.cache/``; when they are in neither,
:class:`~veil.text.DatasetUnavailable` says to run ``make data``.

Reuters-21578 in weka
---------------------
The four ARFF files hold the same documents: a fifth of the ModApte split (weka's
``RemoveFolds -S 0 -N 5 -F 1``), 1,554 training and 604 test newswire stories, each a
string attribute ``Text`` (title and body) with a binary ``class-att {0,1}``: whether
the story carries the Reuters topic *corn* (ReutersCorn) or *grain* (ReutersGrain).

=========  =====  =====  ====  ===============
split      docs   grain  corn  corn, not grain
=========  =====  =====  ====  ===============
train      1,554  103    45    1
test         604   57    24    0
=========  =====  =====  ====  ===============

Corn stories are (all but one) grain stories too, so "corn vs grain" is not a
partition of the documents, and corn-vs-other-grain would leave only 103 / 57
documents. The task this package trains and reports (:func:`reuters_task`,
``TASK = "reuters-grain"``) is the standard weka one: **grain topic or not**, on all
documents, with ReutersGrain's labels as given (train 103 / 1,554 positive, test
57 / 604 positive; always answering "not grain" scores 90.6 % on the test split, the
baseline any accuracy should be read against). :func:`reuters` also serves the corn
files (``topic="corn"``) unchanged.

The texts are returned as stored (escapes decoded; SGML entities such as ``&lt;`` are
left as in the Reuters source).
"""
from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from . import DatasetUnavailable

ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = ROOT / ".cache"
ENV_VAR = "VEIL_DATA_DIR"
HINT = "run `make data` (or set VEIL_DATA_DIR to a directory holding weka/ and fortunes/)"

TASK = "reuters-grain"
TOPICS = ("corn", "grain")
SPLITS = ("train", "test")

# The cookie files of Debian `fortunes` used by fortunes(): everything but ascii-art
# (pictures, not text) and the few files of jokes about groups of people or of
# political / drug humour, which a demo does not need.
FORTUNE_FILES = ("art", "computers", "cookie", "debian", "definitions", "education",
                 "food", "goedel", "humorists", "kids", "law", "linux", "linuxcookie",
                 "love", "magic", "medicine", "miscellaneous", "news", "paradoxum",
                 "people", "perl", "pets", "platitudes", "pratchett", "science",
                 "songs-poems", "sports", "startrek", "tao", "wisdom", "work", "zippy")


# ---------------------------------------------------------------------------- locating

def data_roots() -> list[Path]:
    """Where datasets are looked up, in order: ``$VEIL_DATA_DIR`` (when set), then
    ``<repo>/.cache``."""
    roots = []
    env = os.environ.get(ENV_VAR)
    if env:
        roots.append(Path(env).expanduser())
    roots.append(CACHE_DIR)
    return roots


def locate(subdir: str, files: tuple[str, ...] | list[str]) -> Path:
    """The first ``<root>/<subdir>`` of :func:`data_roots` that holds every one of
    ``files``.

    Raises:
        DatasetUnavailable: no root holds them all; the message says to run make data.
    """
    roots = data_roots()
    for root in roots:
        d = root / subdir
        if all((d / f).is_file() for f in files):
            return d
    tried = ", ".join(str(r / subdir) for r in roots)
    raise DatasetUnavailable(f"{subdir} data not found ({files[0]} is missing in {tried}); "
                             f"{HINT}")


# ------------------------------------------------------------------------------- ARFF

@dataclass
class Arff:
    """A parsed dense ARFF file: ``attributes`` as ``(name, type)`` where type is
    ``"string"``, ``"numeric"``, ``"date"`` or the tuple of nominal values; ``rows`` hold
    ``str`` (string, nominal, date), ``float`` (numeric) or ``None`` (missing ``?``)."""

    relation: str
    attributes: list[tuple[str, str | tuple[str, ...]]] = field(default_factory=list)
    rows: list[tuple] = field(default_factory=list)

    def column(self, name: str) -> list:
        names = [a for a, _ in self.attributes]
        if name not in names:
            raise InputError(f"ARFF relation {self.relation!r} has no attribute {name!r} "
                             f"(it has {names})")
        i = names.index(name)
        return [row[i] for row in self.rows]


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "'": "'", '"': '"', "%": "%"}
_NUMERIC = {"numeric", "real", "integer"}


def _split_values(line: str, lineno: int) -> list[tuple[str, bool]]:
    """Split one ARFF line into ``(value, was_quoted)`` on top-level commas (and on
    whitespace between tokens, as weka's tokenizer does). Quoted values have weka's
    backslash escapes decoded (``\\n \\t \\r \\\\ \\' \\" \\%``)."""
    out: list[tuple[str, bool]] = []
    i, n = 0, len(line)
    expect_value = True
    while i < n:
        c = line[i]
        if c in " \t":
            i += 1
            continue
        if c == ",":
            if expect_value:
                raise InputError(f"ARFF line {lineno}: empty value")
            expect_value = True
            i += 1
            continue
        if c == "%" and not expect_value:   # trailing comment
            break
        if c in "'\"":
            quote, i, buf = c, i + 1, []
            while True:
                if i >= n:
                    raise InputError(f"ARFF line {lineno}: unterminated quoted value")
                ch = line[i]
                if ch == "\\" and i + 1 < n:
                    nxt = line[i + 1]
                    buf.append(_ESCAPES.get(nxt, "\\" + nxt))
                    i += 2
                    continue
                if ch == quote:
                    i += 1
                    break
                buf.append(ch)
                i += 1
            out.append(("".join(buf), True))
        else:
            if c in "{}":
                raise InputError(f"ARFF line {lineno}: sparse instances are not supported")
            j = i
            while j < n and line[j] not in ",%\t '\"":
                j += 1
            out.append((line[i:j], False))
            i = j
        expect_value = False
    if out and expect_value:
        raise InputError(f"ARFF line {lineno}: trailing comma")
    return out


def _parse_type(spec: str, lineno: int) -> str | tuple[str, ...]:
    spec = spec.strip()
    if spec.startswith("{"):
        if not spec.endswith("}"):
            raise InputError(f"ARFF line {lineno}: unterminated nominal type {spec!r}")
        return tuple(v for v, _ in _split_values(spec[1:-1], lineno))
    kind = spec.split()[0].lower() if spec else ""
    if kind in _NUMERIC:
        return "numeric"
    if kind in ("string", "date"):
        return kind
    raise InputError(f"ARFF line {lineno}: unsupported attribute type {spec!r}")


def parse_arff(text: str) -> Arff:
    """Parse a dense ARFF document (``@relation``, ``@attribute``, ``@data``).

    Supports string, nominal, numeric and date attributes, ``'single'`` or ``"double"``
    quoted values with weka's backslash escapes, ``?`` for a missing value and ``%``
    comments. Sparse instances (``{...}``) and relational attributes are refused.

    Raises:
        InputError: the text is not a well-formed dense ARFF document, or a value does
            not fit its attribute (unknown nominal value, non-numeric number).
    """
    arff: Arff | None = None
    in_data = False
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("%"):
            continue
        if not in_data:
            keyword, _, rest = line.partition(" ")
            keyword = keyword.lower()
            rest = rest.strip()
            if keyword == "@relation":
                values = _split_values(rest, lineno)
                arff = Arff(relation=values[0][0] if values else "")
            elif keyword == "@attribute":
                if arff is None:
                    raise InputError(f"ARFF line {lineno}: @attribute before @relation")
                m = re.match(r"""('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|\S+)\s+(.*)$""", rest)
                if not m:
                    raise InputError(f"ARFF line {lineno}: malformed @attribute")
                name = _split_values(m.group(1), lineno)[0][0]
                arff.attributes.append((name, _parse_type(m.group(2), lineno)))
            elif keyword == "@data":
                if arff is None or not arff.attributes:
                    raise InputError(f"ARFF line {lineno}: @data before any @attribute")
                in_data = True
            else:
                raise InputError(f"ARFF line {lineno}: unexpected header line "
                                 f"{line[:40]!r}")
            continue
        if line.startswith("{"):
            raise InputError(f"ARFF line {lineno}: sparse instances are not supported")
        values = _split_values(line, lineno)
        if len(values) != len(arff.attributes):
            raise InputError(f"ARFF line {lineno}: {len(values)} values for "
                             f"{len(arff.attributes)} attributes")
        row = []
        for (value, quoted), (name, kind) in zip(values, arff.attributes):
            if value == "?" and not quoted:
                row.append(None)
            elif kind == "numeric":
                try:
                    row.append(float(value))
                except ValueError:
                    raise InputError(f"ARFF line {lineno}: {name} is numeric, got "
                                     f"{value!r}") from None
            elif isinstance(kind, tuple) and value not in kind:
                raise InputError(f"ARFF line {lineno}: {value!r} is not a value of {name} "
                                 f"{set(kind)}")
            else:
                row.append(value)
        arff.rows.append(tuple(row))
    if arff is None or not in_data:
        raise InputError("not an ARFF document: no @relation / @data section")
    return arff


def read_arff(path: str | Path) -> Arff:
    """:func:`parse_arff` of a file (UTF-8, as weka writes it)."""
    return parse_arff(Path(path).read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------- Reuters

def _reuters_file(split: str, topic: str) -> Path:
    if split not in SPLITS:
        raise InputError(f"split must be one of {SPLITS}, got {split!r}")
    if topic not in TOPICS:
        raise InputError(f"topic must be one of {TOPICS}, got {topic!r}")
    name = f"Reuters{topic.capitalize()}-{split}.arff"
    return locate("weka", (name,)) / name


def reuters(split: str = "train", topic: str = "grain") -> tuple[list[str], np.ndarray]:
    """Reuters-21578 stories of weka's ``Reuters{Corn,Grain}-{train,test}.arff``.

    Returns ``(texts, labels)``: the 1,554 (train) or 604 (test) stories and int64 labels,
    1 when the story carries the Reuters topic ``topic`` (see the module docstring).

    Raises:
        InputError: an unknown split or topic.
        DatasetUnavailable: the ARFF files are not fetched (run ``make data``).
    """
    arff = read_arff(_reuters_file(split, topic))
    names = [a for a, _ in arff.attributes]
    if len(names) != 2 or arff.attributes[0][1] != "string":
        raise InputError(f"{arff.relation!r}: expected a string attribute and a class, got "
                         f"{arff.attributes}")
    texts = [t if t is not None else "" for t in arff.column(names[0])]
    labels = np.asarray([int(v) for v in arff.column(names[1])], dtype=np.int64)
    return texts, labels


def reuters_task(split: str = "train") -> tuple[list[str], np.ndarray]:
    """The task of the shipped head (``TASK``): grain topic (1) or not (0), all stories
    of the split, ReutersGrain's labels as given."""
    return reuters(split, "grain")


# --------------------------------------------------------------------------- fortunes

_OVERSTRIKE = re.compile(r".\x08")


def _fortune_pool(max_chars: int) -> list[str]:
    d = locate("fortunes", FORTUNE_FILES)
    pool: list[str] = []
    for name in FORTUNE_FILES:
        text = (d / name).read_text(encoding="utf-8", errors="replace")
        for chunk in re.split(r"^%\s*$", text, flags=re.MULTILINE):
            chunk = _OVERSTRIKE.sub("", chunk).strip()
            chunk = " ".join(chunk.split())          # one line, single spaces
            if chunk and len(chunk) <= max_chars:
                pool.append(chunk)
    return pool


def fortunes(n: int = 100, *, max_chars: int = 160, seed: int = 0) -> list[str]:
    """``n`` short texts from Debian's fortune cookies, deterministic for a given
    ``(n, max_chars, seed)``: the cookies of :data:`FORTUNE_FILES` (split on ``%``
    lines, overstrike sequences removed, whitespace collapsed to single spaces) of at
    most ``max_chars`` characters, shuffled with ``seed``, the first ``n``.

    Raises:
        InputError: ``n`` is negative or more than there are short cookies.
        DatasetUnavailable: the fortune files are not fetched (run ``make data``).
    """
    if n < 0:
        raise InputError(f"n must be >= 0, got {n}")
    pool = _fortune_pool(max_chars)
    if n > len(pool):
        raise InputError(f"only {len(pool)} fortunes have at most {max_chars} characters, "
                         f"asked for {n}")
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    return [pool[i] for i in order[:n]]
