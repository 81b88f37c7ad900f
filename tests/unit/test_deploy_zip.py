"""The Lambda zip is deterministic: same files, same bytes, same hash; any change, a new hash."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import pytest

from gpuctl.errors import ConfigError
from gpuctl.services.deploy import build_lambda_zip, find_sources


def _folder(root: Path) -> Path:
    folder = root / "lambda"
    (folder / "pkg").mkdir(parents=True)
    (folder / "handler.py").write_text("from decide import decide\n\ndef lambda_handler(event, context):\n    pass\n")
    (folder / "decide.py").write_text("def decide():\n    return None\n")
    (folder / "pkg" / "util.py").write_text("X = 1\n")
    return folder


def test_same_files_give_the_same_bytes(tmp_path: Path) -> None:
    """Two builds of the same folder are byte-for-byte identical."""
    folder = _folder(tmp_path)

    first, second = build_lambda_zip(folder), build_lambda_zip(folder)

    assert first.data == second.data
    assert first.sha256 == second.sha256
    assert first.key == f"lambda/gpuctl-lambda-{first.sha256[:16]}.zip"


def test_timestamps_and_permissions_do_not_matter(tmp_path: Path) -> None:
    """Touching files or changing their mode does not change the zip."""
    # GIVEN a build
    folder = _folder(tmp_path)
    before = build_lambda_zip(folder)
    # WHEN the files get other mtimes and modes (as a fresh checkout would give them)
    for path in folder.rglob("*.py"):
        os.utime(path, (1_000_000_000, 1_000_000_000))
        path.chmod(0o600)
    # THEN the bytes are the same
    assert build_lambda_zip(folder).data == before.data


def test_a_changed_file_changes_the_hash(tmp_path: Path) -> None:
    """Editing one file gives a new hash, so a new object key and a Lambda update."""
    folder = _folder(tmp_path)
    before = build_lambda_zip(folder)

    (folder / "decide.py").write_text("def decide():\n    return 1\n")

    after = build_lambda_zip(folder)
    assert after.sha256 != before.sha256
    assert after.key != before.key


def test_entries_are_sorted_with_fixed_metadata_and_no_bytecode(tmp_path: Path) -> None:
    """Entries are sorted, dated 1980-01-01, mode 0644; __pycache__, *.pyc and dotfiles are left out."""
    # GIVEN a folder with bytecode and editor litter
    folder = _folder(tmp_path)
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "handler.cpython-311.pyc").write_bytes(b"\x00")
    (folder / "stale.pyc").write_bytes(b"\x00")
    (folder / ".DS_Store").write_bytes(b"\x00")
    # WHEN it is zipped
    bundle = build_lambda_zip(folder)
    # THEN only the sources are in it, in order, with fixed metadata
    with zipfile.ZipFile(io.BytesIO(bundle.data)) as archive:
        infos = archive.infolist()
        assert [i.filename for i in infos] == ["decide.py", "handler.py", "pkg/util.py"]
        assert {i.date_time for i in infos} == {(1980, 1, 1, 0, 0, 0)}
        assert {(i.external_attr >> 16) & 0o777 for i in infos} == {0o644}
        assert archive.read("pkg/util.py") == b"X = 1\n"
    assert bundle.files == ("decide.py", "handler.py", "pkg/util.py")


def test_a_folder_without_handler_is_refused(tmp_path: Path) -> None:
    """A folder with no handler.py is not a Lambda; the error says so."""
    (tmp_path / "decide.py").write_text("x = 1\n")

    with pytest.raises(ConfigError, match=r"no handler\.py"):
        build_lambda_zip(tmp_path)


def test_sources_are_found_in_the_checkout() -> None:
    """In a checkout the template and the Lambda folder next to the package are used."""
    sources = find_sources()

    assert sources.template.name == "cloudformation.yaml"
    assert (sources.lambda_dir / "handler.py").is_file()
    assert build_lambda_zip(sources.lambda_dir).files  # the real folder zips
