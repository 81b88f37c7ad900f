"""The input checks shared by the CLI and the adapter: image limits, https URL rules, redaction."""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import pytest

from gpuctl.inputs import (
    ImageLimits,
    InputRejected,
    InputUnavailable,
    check_https_url,
    display,
    inspect_image,
    redact_url,
)
from tests.helpers import make_image

LIMITS = ImageLimits(max_bytes=20 * 1024 * 1024, max_pixels=40_000_000, max_side=12000)


def _resolver(*addresses: str):
    return lambda host, port: list(addresses)


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that claims to be width×height (the shape of a decompression bomb)."""
    import struct

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_a_real_image_passes_and_reports_its_header(tmp_path: Path) -> None:
    """A small PNG passes with its format, dimensions and content type."""
    info = inspect_image(make_image(tmp_path / "a.png", size=(64, 48)), name="a.png", limits=LIMITS)
    assert (info.format, info.width, info.height, info.content_type, info.extension) == (
        "PNG", 64, 48, "image/png", "png")


@pytest.mark.parametrize(("width", "height", "message"), [
    (10000, 10000, "megapixel limit"),
    (40000, 4, "longest side may be at most 12000"),
    (200000, 200000, "more pixels than any input may have"),
])
def test_bombs_are_refused_from_the_header_in_one_sentence(width: int, height: int, message: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A header that claims too many pixels is refused before decoding, with no Pillow warning printed."""
    data = _png_header_only(width, height)
    with pytest.raises(InputRejected, match=message):
        inspect_image(data, name="bomb.png", limits=LIMITS)
    assert capsys.readouterr().err == ""


def test_too_many_bytes_names_the_limit() -> None:
    """The byte limit is checked first and named with its setting."""
    with pytest.raises(InputRejected, match=r"larger than the 0\.5 MB limit \(max_image_mb\)"):
        inspect_image(b"x" * (600 * 1024), name="big.png", limits=ImageLimits(512 * 1024, 40_000_000, 12000))


@pytest.mark.parametrize("data", [b"", b"<html>hi</html>", b"\x89PNG\r\n\x1a\n garbage"])
def test_garbage_is_not_an_image(data: bytes) -> None:
    with pytest.raises(InputRejected, match=r"not an image gpuctl can read|not a valid image"):
        inspect_image(data, name="x", limits=LIMITS)


def test_an_unsupported_format_is_named(tmp_path: Path) -> None:
    """A format Pillow reads but gpuctl does not take (ICO) is refused by name."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, format="ICO")
    with pytest.raises(InputRejected, match="is a ICO image"):
        inspect_image(buf.getvalue(), name="x.ico", limits=LIMITS)


@pytest.mark.parametrize("address", [
    "169.254.169.254", "127.0.0.1", "10.0.0.5", "172.16.3.4", "192.168.1.1", "100.64.0.1", "0.0.0.0",
    "::1", "fe80::1", "fd00:ec2::254", "::ffff:169.254.169.254", "224.0.0.1", "240.0.0.1",
])
def test_non_public_addresses_are_refused(address: str) -> None:
    with pytest.raises(InputRejected, match="only fetches from public addresses"):
        check_https_url("https://images.example.com/a.png", resolve=_resolver(address))


def test_ip_literal_hosts_skip_dns() -> None:
    """An IP literal is checked as it is (no resolver call)."""
    def boom(host: str, port: int) -> list[str]:
        raise AssertionError("resolved")

    assert check_https_url("https://93.184.216.34/a.png", resolve=boom) == ["93.184.216.34"]
    with pytest.raises(InputRejected):
        check_https_url("https://[::1]/a.png", resolve=boom)


@pytest.mark.parametrize(("url", "message"), [
    ("http://example.com/a.png", "must be https:// or s3://"),
    ("ftp://example.com/a.png", "must be https:// or s3://"),
    ("https:///nohost", "has no host"),
    ("https://example.com:99999/a.png", "not a valid URL"),
    ("https://exa\u202emple.com/a.png", "not a valid host name"),
    ("https://-bad-.example.com/a.png", "not a valid host name"),
])
def test_malformed_urls_are_refused(url: str, message: str) -> None:
    with pytest.raises(InputRejected, match=message):
        check_https_url(url, resolve=_resolver("93.184.216.34"))


def test_credentials_are_refused_without_being_echoed() -> None:
    """A URL with a user and password is refused, and neither appears in the message."""
    with pytest.raises(InputRejected) as caught:
        check_https_url("https://alice:s3cret@example.com/a.png", resolve=_resolver("93.184.216.34"))
    assert "s3cret" not in str(caught.value) and "alice" not in str(caught.value)


def test_the_real_resolver_refuses_an_unknown_host() -> None:
    """A host that does not resolve is refused (the test machine has no DNS; .invalid never resolves)."""
    with pytest.raises(InputRejected, match="does not resolve"):
        check_https_url("https://no-such-host.invalid/a.png")


def test_a_resolver_that_says_try_again_is_transient() -> None:
    def again(host: str, port: int) -> list[str]:
        raise InputUnavailable("try again")

    with pytest.raises(InputUnavailable):
        check_https_url("https://example.com/a.png", resolve=again)


def test_redaction_drops_userinfo_and_query() -> None:
    url = "https://AKIA:secret@bucket.s3.amazonaws.com/in.png?X-Amz-Signature=abc&X-Amz-Security-Token=tok"
    shown = redact_url(url)
    assert shown == "https://bucket.s3.amazonaws.com/in.png?…"
    assert display("a\u202eb\x00c") == "a\\u202eb\\u0000c"
