"""What a compressed frame says about itself, read before it is decoded.

A JPEG, JPEG-LS or JPEG 2000 decoder sizes its output from the codestream's own frame
header, not from the DICOM header: a 1 KB frame whose header claims 65535 x 65535
pixels makes the decoder allocate gigabytes. :func:`stream_geometry` reads that header
(pure, on bytes; nothing is decoded) so the caller can refuse a frame whose geometry
differs from the file's Rows, Columns and Samples per Pixel, which are already bounded.

JPEG and JPEG-LS share the SOF segment layout (ISO/IEC 10918-1 B.2.2, 14495-1 C.2.2):
pydicom's parser of it is used. JPEG 2000's SIZ segment (ISO/IEC 15444-1 A.5.1) is
read here: pydicom's ``get_j2k_parameters`` returns the precision only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pydicom.pixels.utils import _get_jpg_parameters
from pydicom.uid import UID, JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes, JPEGTransferSyntaxes

__all__ = ["StreamGeometry", "j2k_geometry", "jpeg_geometry", "sizes_itself", "stream_geometry"]

_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
"""The JP2 signature box (15444-1 I.5.1), always the file's first 12 bytes."""
_JP2_CODESTREAM_BOX = b"jp2c"
_SOC_SIZ = b"\xff\x4f\xff\x51"


@dataclass(frozen=True)
class StreamGeometry:
    """A frame's size as its codestream declares it."""

    rows: int
    columns: int
    components: int


def jpeg_geometry(stream: bytes) -> StreamGeometry | None:
    """A JPEG or JPEG-LS frame's SOF values; None when there is no readable SOF."""
    info = _get_jpg_parameters(stream)
    try:
        return StreamGeometry(int(info["height"]), int(info["width"]), int(info["components"]))
    except (KeyError, TypeError, ValueError):
        return None


def _j2k_codestream_start(stream: bytes) -> int | None:
    """Where the J2K codestream starts: 0, or inside a JP2 file's ``jp2c`` box."""
    if not stream.startswith(_JP2_SIGNATURE):
        return 0
    offset = len(_JP2_SIGNATURE)
    while offset + 8 <= len(stream):
        length = int.from_bytes(stream[offset : offset + 4], "big")
        if stream[offset + 4 : offset + 8] == _JP2_CODESTREAM_BOX:
            return offset + 8
        if length == 1 and offset + 16 <= len(stream):  # XLBox: a 64-bit length
            length = int.from_bytes(stream[offset + 8 : offset + 16], "big")
        if length < 8:  # 0 = "to the end of the file", or malformed: no codestream
            return None
        offset += length
    return None


def j2k_geometry(stream: bytes) -> StreamGeometry | None:
    """A JPEG 2000 frame's SIZ values (image area minus its offset); None when the
    codestream does not start with SOC and SIZ as 15444-1 A.3 requires."""
    start = _j2k_codestream_start(stream)
    if start is None or stream[start : start + 4] != _SOC_SIZ or len(stream) < start + 42:
        return None

    def field(offset: int, size: int) -> int:
        return int.from_bytes(stream[start + offset : start + offset + size], "big")

    # After SOC (2 bytes) and the SIZ marker (2): Lsiz 2, Rsiz 2, Xsiz 4, Ysiz 4,
    # XOsiz 4, YOsiz 4, XTsiz 4, YTsiz 4, XTOsiz 4, YTOsiz 4, Csiz 2.
    width, height = field(8, 4) - field(16, 4), field(12, 4) - field(20, 4)
    if width < 1 or height < 1:
        return None
    return StreamGeometry(height, width, field(40, 2))


_PARSERS: dict[str, Callable[[bytes], StreamGeometry | None]] = {
    **dict.fromkeys(JPEG2000TransferSyntaxes, j2k_geometry),
    **dict.fromkeys(JPEGTransferSyntaxes, jpeg_geometry),
    **dict.fromkeys(JPEGLSTransferSyntaxes, jpeg_geometry),
}
"""The transfer syntaxes whose decoders size their output from the codestream, and
the parser of each one's frame header."""


def sizes_itself(syntax: UID) -> bool:
    """Whether ``syntax``'s decoders take the output size from the codestream."""
    return syntax in _PARSERS


def stream_geometry(syntax: UID, stream: bytes) -> StreamGeometry | None:
    """The declared geometry of one encapsulated frame in ``syntax``; None when the
    header cannot be read, or when ``syntax``'s decoders do not size themselves from
    the stream (see :func:`sizes_itself`)."""
    parser = _PARSERS.get(syntax)
    return None if parser is None else parser(stream)
