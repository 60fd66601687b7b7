"""``hmmsim oracle build``: config generation and the "did it stick" check (on the real
configs olddefconfig made for 6.12.117 and 7.3.4), source selection, the image cache, and
progress parsing. Nothing here downloads, builds or boots anything."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from hmmsim.cli import main
from hmmsim.oracle import build
from hmmsim.oracle.build import (
    HMM_OPTIONS,
    RELEASES,
    BuildError,
    build_kernel,
    classify_source,
    config_fragment,
    image_is_complete,
    missing_build_deps,
    options_not_stuck,
    parse_config,
    parse_make_line,
    progress_fraction,
    release_of_package,
    tree_version,
)
from hmmsim.oracle.cache import cache_root

DATA = Path(__file__).parent / "data" / "kbuild"


def test_config_fragment_asks_for_every_hmm_option() -> None:
    frag = config_fragment()
    lines = frag.splitlines()
    assert len(lines) == len(HMM_OPTIONS)
    for opt in ("ZONE_DEVICE", "DEVICE_PRIVATE", "MIGRATION", "MMU_NOTIFIER", "HMM_MIRROR", "GUP_TEST",
                "TRANSPARENT_HUGEPAGE", "HUGETLBFS", "USERFAULTFD", "BLK_DEV_INITRD", "DEVTMPFS", "MODULES",
                "SERIAL_8250_CONSOLE", "BINFMT_SCRIPT", "BUG", "64BIT"):
        assert f"CONFIG_{opt}=y" in lines
    assert "CONFIG_TEST_HMM=m" in lines  # a module: reloaded per scenario file


def test_parse_config_reads_set_unset_and_strings() -> None:
    cfg = parse_config('CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=m\nCONFIG_D="x y"\n# comment\n')
    assert cfg == {"A": "y", "B": "n", "C": "m", "D": "x y"}


@pytest.mark.parametrize("release, missing", [
    ("6.12", []),
    # 7.3 has no PROC_SYSCTL any more: its sysctl option is SYSCTL (which is set)
    ("7.3", [("PROC_SYSCTL", "y", "absent")]),
])
def test_options_not_stuck_on_the_real_configs(release: str, missing: list) -> None:
    text = (DATA / f"config-{release}").read_text()
    assert options_not_stuck(text) == missing
    cfg = parse_config(text)
    assert cfg["TEST_HMM"] == "m" and cfg["DEVICE_PRIVATE"] == "y" and cfg["SYSCTL"] == "y"


def test_options_not_stuck_reports_dropped_and_forced_values() -> None:
    text = (DATA / "config-7.3").read_text()
    text = text.replace("CONFIG_DEVICE_PRIVATE=y", "# CONFIG_DEVICE_PRIVATE is not set")
    text = text.replace("CONFIG_TEST_HMM=m", "CONFIG_TEST_HMM=y")  # built in: the code is there
    text = text.replace("CONFIG_HUGETLBFS=y\n", "")
    bad = options_not_stuck(text)
    assert ("DEVICE_PRIVATE", "y", "n") in bad and ("HUGETLBFS", "y", "absent") in bad
    assert not any(b[0] == "TEST_HMM" for b in bad)
    assert options_not_stuck("CONFIG_X=m\n", [("X", "y", "")]) == [("X", "y", "m")]


def test_releases_name_their_debian_packages() -> None:
    assert RELEASES["6.12"].package == "linux-source-6.12" and RELEASES["6.12"].suite == "bookworm-security"
    assert RELEASES["7.3"].package == "linux-source-7.3" and RELEASES["7.3"].suite == "trixie-backports"
    assert "debian-security bookworm-security main" in RELEASES["6.12"].sources_line
    assert RELEASES["7.3"].sources_line.endswith("debian trixie-backports main")
    assert release_of_package("linux-source-7.3_7.3.4-1~bpo13+1_all.deb") == ("7.3", "7.3.4-1~bpo13+1")
    assert release_of_package("/x/linux-source-6.12_6.12.117-1~deb12u1_all.deb") == ("6.12", "6.12.117-1~deb12u1")
    assert release_of_package("linux-image-7.3_all.deb") is None


def test_apt_private_sources_list_leaves_the_machine_alone(tmp_path: Path) -> None:
    opts = build._apt_private(tmp_path, RELEASES["7.3"])
    assert (tmp_path / "apt" / "sources.list").read_text() == RELEASES["7.3"].sources_line + "\n"
    joined = " ".join(opts)
    assert f"Dir::Etc::SourceList={tmp_path}/apt/sources.list" in joined
    assert "Dir::Etc::SourceParts=/dev/null" in joined and f"Dir::State::Lists={tmp_path}/apt/lists" in joined


def _tree(root: Path, version: str = "VERSION = 7\nPATCHLEVEL = 3\nSUBLEVEL = 4\nEXTRAVERSION =\n") -> Path:
    (root / "mm").mkdir(parents=True)
    (root / "Makefile").write_text(f"# SPDX\n{version}NAME = x\n")
    (root / "mm" / "hmm.c").write_text("/* */\n")
    return root


def test_classify_source_release_tree_tarball(tmp_path: Path) -> None:
    assert classify_source("7.3").kind == "release" and classify_source("6.12").name == "6.12"
    tree = _tree(tmp_path / "linux")
    s = classify_source(str(tree))
    assert (s.kind, s.path) == ("tree", tree.resolve())
    tgz = tmp_path / "linux-7.3.4.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(tree, arcname="linux-7.3.4")
    assert classify_source(str(tgz)).kind == "tarball"
    assert build._name_for(classify_source(str(tgz))) == "linux-7.3.4"
    assert build._name_for(s) == "7.3.4"
    (tmp_path / "notkernel").mkdir()
    with pytest.raises(BuildError, match="not a kernel source tree"):
        classify_source(str(tmp_path / "notkernel"))
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(BuildError, match="not a tar archive"):
        classify_source(str(tmp_path / "x.txt"))
    with pytest.raises(BuildError, match="neither a known release"):
        classify_source("5.4")


def test_tree_version() -> None:
    assert tree_version("VERSION = 6\nPATCHLEVEL = 12\nSUBLEVEL = 117\nEXTRAVERSION =\n") == "6.12.117"
    assert tree_version("VERSION = 6\nPATCHLEVEL = 14\nSUBLEVEL = 0\nEXTRAVERSION = -rc1\n") == "6.14.0-rc1"
    with pytest.raises(BuildError):
        tree_version("all:\n\ttrue\n")


def test_cache_root_order() -> None:
    assert cache_root({"HMMSIM_CACHE": "/c", "XDG_CACHE_HOME": "/x", "HOME": "/h"}) == Path("/c")
    assert cache_root({"HMMSIM_CACHE": "", "XDG_CACHE_HOME": "/x", "HOME": "/h"}) == Path("/x/hmmsim")
    assert cache_root({"HOME": "/h"}) == Path("/h/.cache/hmmsim")


def _image(d: Path, module: bool = True, **meta: object) -> Path:
    d.mkdir(parents=True)
    for f in ("bzImage", "hmm-tests", "config"):
        (d / f).write_bytes(b"x")
    if module:
        (d / "test_hmm.ko").write_bytes(b"x")
    info = {"version": "7.3.4", "test_hmm_module": module, "source": {"what": "Debian linux-source-7.3"},
            "not_stuck": [{"option": "PROC_SYSCTL", "wanted": "y", "got": "absent"}], **meta}
    (d / "build.json").write_text(json.dumps(info))
    return d


def test_image_is_complete(tmp_path: Path) -> None:
    d = _image(tmp_path / "a")
    assert image_is_complete(d)
    (d / "test_hmm.ko").unlink()
    assert not image_is_complete(d)  # build.json says test_hmm is a module
    assert image_is_complete(_image(tmp_path / "b", module=False))
    e = _image(tmp_path / "c")
    (e / "build.json").write_text("{")
    assert not image_is_complete(e)
    assert not image_is_complete(tmp_path / "missing")


def test_a_second_build_of_a_cached_release_does_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _image(tmp_path / "kernels" / "7.3", fingerprint="7.3")

    def no(*a: object, **k: object) -> None:
        raise AssertionError("a cached build ran a step")

    monkeypatch.setattr(build, "_install_deps", no)
    monkeypatch.setattr(build.subprocess, "run", no)
    monkeypatch.setattr(build.subprocess, "Popen", no)
    said: list[str] = []
    assert build_kernel("7.3", root=tmp_path, say=said.append) == tmp_path / "kernels" / "7.3"
    assert "cached" in said[0]
    # --force, or an incomplete image, goes on to build
    for kw in ({"force": True}, {}):
        if not kw:
            (tmp_path / "kernels" / "7.3" / "bzImage").unlink()
        with pytest.raises(AssertionError, match="ran a step"):
            build_kernel("7.3", root=tmp_path, say=said.append, **kw)


def test_a_changed_tarball_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tgz = tmp_path / "linux-7.3.4.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        info = tarfile.TarInfo("linux-7.3.4/Makefile")
        data = b"VERSION = 7\nPATCHLEVEL = 3\n"
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    root = tmp_path / "cache"
    _image(root / "kernels" / "linux-7.3.4", fingerprint="elsewhere:1:2")
    monkeypatch.setattr(build, "_install_deps", lambda b: (_ for _ in ()).throw(AssertionError("rebuild")))
    with pytest.raises(AssertionError, match="rebuild"):
        build_kernel(str(tgz), root=root, say=lambda m: None)
    meta = json.loads((root / "kernels" / "linux-7.3.4" / "build.json").read_text())
    meta["fingerprint"] = build._fingerprint(classify_source(str(tgz)))
    (root / "kernels" / "linux-7.3.4" / "build.json").write_text(json.dumps(meta))
    assert build_kernel(str(tgz), root=root, say=lambda m: None).name == "linux-7.3.4"


def test_oracle_build_command_on_a_cached_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HMMSIM_CACHE", str(tmp_path))
    _image(tmp_path / "kernels" / "7.3", fingerprint="7.3")
    assert main(["oracle", "build", "--kernel", "7.3"]) == 0
    out = capsys.readouterr()
    assert "Linux 7.3.4" in out.out
    assert "options that did not stick: CONFIG_PROC_SYSCTL (wanted y, got absent)" in out.out
    assert main(["oracle", "build", "--kernel", str(tmp_path / "nothing")]) == 1
    assert "neither a known release" in capsys.readouterr().err


def test_parse_make_line_on_a_real_kbuild_log() -> None:
    lines = (DATA / "make-7.3-head.log").read_text().splitlines()
    parsed = [parse_make_line(ln) for ln in lines]
    assert parsed[0] == ("SYNC", "include/config/auto.conf.cmd")
    assert ("CC", "scripts/mod/empty.o") in parsed
    assert sum(p is not None for p in parsed) >= 55
    assert parse_make_line("  LD [M]  lib/test_hmm.ko") == ("LD [M]", "lib/test_hmm.ko")
    assert parse_make_line("make[1]: Entering directory '/x'") is None
    assert parse_make_line("mm/hmm.c:12:3: warning: unused variable") is None
    assert progress_fraction(50, 100) == 0.5 and progress_fraction(120, 100) == 0.99
    assert progress_fraction(5, None) is None


def test_missing_build_deps() -> None:
    assert missing_build_deps(lambda p: "/usr/bin/" + p, lambda p: True) == []
    miss = missing_build_deps(lambda p: None if p in ("flex", "bison") else "/usr/bin/" + p,
                              lambda p: not p.endswith("gelf.h"))
    assert miss == ["flex", "bison", "libelf-dev"]


def test_configure_keeps_an_unchanged_config_old(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Re-running tinyconfig + olddefconfig on a built tree gives the same .config: its time
    is kept, so the incremental make does not resync the configuration."""
    final = (DATA / "config-7.3").read_text()
    cfg = tmp_path / ".config"
    cfg.write_text(final)
    os.utime(cfg, (1_000_000, 1_000_000))
    calls = []

    def fake_run(self: object, step: str, argv: list[str], cwd: Path, **kw: object) -> None:  # make's stand-in
        calls.append(step)
        cfg.write_text("CONFIG_64BIT=y\n" if step == "tinyconfig" else final)

    b = build._Build(classify_source("7.3"), "7.3", tmp_path, 2, lambda m: None, tmp_path / "logs")
    monkeypatch.setattr(build._Build, "run", fake_run)
    text, bad = build._configure(b, tmp_path, [], tmp_path)
    assert calls == ["tinyconfig", "olddefconfig"] and text == final
    assert bad == [("PROC_SYSCTL", "y", "absent")] and cfg.stat().st_mtime == 1_000_000
    cfg.write_text(final.replace("CONFIG_TEST_HMM=m", "CONFIG_TEST_HMM=y"))  # a changed config: new time
    build._configure(b, tmp_path, [], tmp_path)
    assert cfg.stat().st_mtime > 1_000_000
